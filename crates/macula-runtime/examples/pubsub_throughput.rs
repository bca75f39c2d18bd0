//! Two-node pub/sub throughput over QUIC on 127.0.0.1, for profiling the hot
//! path (the `macula bench pubsub` figures come from the CLI). Publishes
//! COUNT messages of SIZE bytes flat out, or paced (`paced`: waits for the
//! outbound queue to drain every 4096 messages, so nothing is dropped and
//! the figure is the pipeline's capacity).
//!
//! ```sh
//! cargo run --release -p macula-runtime --example pubsub_throughput -- 200000 64 [paced]
//! valgrind --tool=callgrind target/release/examples/pubsub_throughput 50000 64 paced
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use macula_runtime::pubsub::{PublishOptions, SubscriptionItem};
use macula_runtime::{NodeConfig, NodeRuntime, PeerAddr};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let count: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000)
        .min(10_000_000);
    let size: usize = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64)
        .min(1 << 16);
    let paced = args.get(3).is_some_and(|a| a == "paced");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let run = async move {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let a = NodeRuntime::start(NodeConfig {
            listen: loopback,
            ..NodeConfig::default()
        })
        .await
        .expect("node a");
        let b = NodeRuntime::start(NodeConfig {
            listen: loopback,
            bootstrap: vec![PeerAddr::from(a.local_addr())],
            ..NodeConfig::default()
        })
        .await
        .expect("node b");
        b.dht().wait_bootstrapped().await.expect("join");
        let mut sub = b
            .pubsub()
            .subscribe_mesh("tput.*")
            .await
            .expect("subscribe");
        let payload = Bytes::from(vec![7u8; size]);
        let ps = a.pubsub().clone();
        ps.publish_mesh("tput.warm", payload.clone(), PublishOptions::default())
            .await
            .expect("publish");
        let _ = sub.next().await;
        let consumer = tokio::spawn(async move {
            let (mut got, mut lagged) = (0u64, 0u64);
            while let Some(item) = sub.next().await {
                match item {
                    SubscriptionItem::Event(e) if e.topic == "tput.end" => break,
                    SubscriptionItem::Event(_) => got += 1,
                    SubscriptionItem::Lagged(n) => lagged += n,
                }
            }
            (got, lagged)
        });
        let t = Instant::now();
        for i in 0..count {
            ps.publish_mesh("tput.data", payload.clone(), PublishOptions::default())
                .await
                .expect("publish");
            if paced && i % 4096 == 4095 {
                ps.flush(Duration::from_secs(10)).await.expect("flush");
            }
        }
        let publish_secs = t.elapsed().as_secs_f64();
        ps.flush(Duration::from_secs(30)).await.expect("flush");
        ps.publish_mesh("tput.end", Bytes::new(), PublishOptions::default())
            .await
            .expect("publish");
        let (got, lagged) = tokio::time::timeout(Duration::from_secs(60), consumer)
            .await
            .expect("consumer finished")
            .expect("consumer task");
        let secs = t.elapsed().as_secs_f64();
        let c = ps.counters();
        println!(
            "{count} x {size} B{}: published {:.0}/s, delivered {:.0}/s ({got} delivered, {lagged} lagged at the subscriber, {} dropped at the publisher, {} batches)",
            if paced { " paced" } else { "" },
            count as f64 / publish_secs,
            got as f64 / secs,
            c.remote_dropped_total.get(),
            c.batches_sent_total.get(),
        );
        a.shutdown().await;
        b.shutdown().await;
    };
    rt.block_on(run);
}
