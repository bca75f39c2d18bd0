//! The streams' metrics, read from the hosted streams at each scrape
//! (labels: `stream`, at most `StreamLimits::max_streams` values; consumers
//! are summed per stream so their names never become labels).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::Streams;

/// Metric families this collector exports (pinned by a test).
pub const FAMILIES: usize = 22;

/// The collector (registered by `admin::registry`).
#[derive(Debug)]
pub struct StreamCollector {
    /// The node's streams.
    pub streams: Streams,
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(String, i64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (stream, v) in rows {
        ConstGauge::new(*v).encode(family.encode_family(&[("stream", stream.as_str())])?)?;
    }
    Ok(())
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(String, u64)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (stream, v) in rows {
        ConstCounter::new(*v).encode(family.encode_family(&[("stream", stream.as_str())])?)?;
    }
    Ok(())
}

impl Collector for StreamCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let infos: Vec<_> = self
            .streams
            .names()
            .into_iter()
            .filter_map(|n| self.streams.info(&n).ok())
            .collect();
        let broken = self.streams.broken().len();
        let hosted = self.streams.names().len().saturating_sub(broken);
        ConstGauge::new(hosted as i64).encode(encoder.encode_descriptor(
            "macula_streams",
            "Streams this node hosts.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(broken as i64).encode(encoder.encode_descriptor(
            "macula_streams_broken",
            "Stream files this node could not open (left untouched; see the log or `macula stream ls`).",
            None,
            MetricType::Gauge,
        )?)?;
        let (publishes, pulls, delivered) = self.streams.totals();
        for (name, help, v) in [
            (
                "macula_stream_publishes",
                "Acknowledged publishes stored (on disk when answered).",
                publishes,
            ),
            (
                "macula_stream_pulls",
                "Pull requests served by the node's consumers.",
                pulls,
            ),
            (
                "macula_stream_delivered",
                "Messages delivered by the node's consumers (redeliveries included).",
                delivered,
            ),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let (forwarded, installs) = self.streams.replication_totals();
        for (name, help, v) in [
            (
                "macula_stream_forwarded",
                "Operations on a replicated stream this node sent on to the stream's leader.",
                forwarded,
            ),
            (
                "macula_stream_replica_installs",
                "Replicated streams' snapshots this node installed (records fetched from the leader).",
                installs,
            ),
        ] {
            ConstCounter::new(v).encode(encoder.encode_descriptor(
                name,
                help,
                None,
                MetricType::Counter,
            )?)?;
        }
        let replicas = self.streams.replicas();
        let rg = |f: &dyn Fn(&super::ReplicaCounters) -> u64| -> Vec<(String, i64)> {
            replicas
                .iter()
                .map(|(n, r)| (n.clone(), i64::try_from(f(r)).unwrap_or(i64::MAX)))
                .collect()
        };
        gauge(
            &mut encoder,
            "macula_stream_replica_leader",
            "1 while this node leads (and serves) the replicated stream, else 0.",
            &rg(&|r| u64::from(r.serving)),
        )?;
        gauge(
            &mut encoder,
            "macula_stream_replica_applied_index",
            "The Raft log index this node's copy of the replicated stream has applied.",
            &rg(&|r| r.applied),
        )?;
        counter(
            &mut encoder,
            "macula_stream_replication_failures",
            "Writes this node proposed as the replicated stream's leader that were not committed (refused, leadership lost, no quorum in time), per stream.",
            &replicas
                .iter()
                .map(|(n, r)| (n.clone(), r.replication_failures))
                .collect::<Vec<_>>(),
        )?;
        let rows = |f: &dyn Fn(&super::StreamInfo) -> u64| -> Vec<(String, u64)> {
            infos
                .iter()
                .map(|i| (i.config.name.clone(), f(i)))
                .collect()
        };
        let g = |f: &dyn Fn(&super::StreamInfo) -> u64| -> Vec<(String, i64)> {
            infos
                .iter()
                .map(|i| {
                    (
                        i.config.name.clone(),
                        i64::try_from(f(i)).unwrap_or(i64::MAX),
                    )
                })
                .collect()
        };
        gauge(
            &mut encoder,
            "macula_stream_messages",
            "Messages stored, per stream.",
            &g(&|i| i.messages),
        )?;
        gauge(
            &mut encoder,
            "macula_stream_bytes",
            "Bytes stored, per stream.",
            &g(&|i| i.bytes),
        )?;
        gauge(
            &mut encoder,
            "macula_stream_consumers",
            "Consumers, per stream.",
            &g(&|i| i.consumers.len() as u64),
        )?;
        counter(
            &mut encoder,
            "macula_stream_stored",
            "Messages stored, per stream.",
            &rows(&|i| i.counters.stored),
        )?;
        counter(
            &mut encoder,
            "macula_stream_duplicates",
            "Publishes dropped as duplicates of a message ID in the window, per stream.",
            &rows(&|i| i.counters.duplicates),
        )?;
        counter(
            &mut encoder,
            "macula_stream_refused",
            "Publishes refused (full with discard new, too large, TTL not allowed), per stream.",
            &rows(&|i| i.counters.refused),
        )?;
        counter(&mut encoder, "macula_stream_capture_lost", "Events on a stream's subjects lost before they were stored (the capture fell behind), per stream.", &rows(&|i| i.counters.capture_lost))?;
        counter(
            &mut encoder,
            "macula_stream_commits",
            "Group commits of the stream's store, per stream.",
            &rows(&|i| i.counters.commits),
        )?;
        gauge(
            &mut encoder,
            "macula_stream_write_queue_bytes",
            "Bytes in the stream store's writer queue (writes queued, not committed to redb yet; record bytes plus 128 per write), per stream. Bounded by write_queue_bytes for publishes.",
            &g(&|i| i.counters.write_queue_bytes),
        )?;
        counter(
            &mut encoder,
            "macula_stream_write_queue_waits",
            "Publishes that found the stream store's writer queue full and waited for room, per stream.",
            &rows(&|i| i.counters.write_queue_waits),
        )?;
        counter(
            &mut encoder,
            "macula_stream_write_queue_refused",
            "Publishes refused (error kind busy) after waiting write_queue_timeout for room in the stream store's writer queue, per stream.",
            &rows(&|i| i.counters.write_queue_refused),
        )?;
        let mut family = encoder.encode_descriptor(
            "macula_stream_removed",
            "Messages removed, per stream and reason (limits, age, ttl, acked, purged).",
            None,
            MetricType::Counter,
        )?;
        for i in &infos {
            let c = &i.counters;
            for (reason, v) in [
                ("limits", c.removed_limits),
                ("age", c.removed_age),
                ("ttl", c.removed_ttl),
                ("acked", c.removed_acked),
                ("purged", c.removed_purged),
            ] {
                ConstCounter::new(v).encode(
                    family
                        .encode_family(&[("stream", i.config.name.as_str()), ("reason", reason)])?,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_family_is_exported_with_help_and_type() {
        let dir = tempfile::tempdir().expect("dir");
        let ps = crate::pubsub::PubSub::new(
            macula_wire::NodeId::from_bytes([1; 32]),
            1 << 20,
            macula_pubsub::Limits::default(),
        );
        let streams = Streams::open(
            Some(dir.path().to_path_buf()),
            ps,
            crate::config::StreamLimits::default(),
            crate::clock::Clock::new(),
        );
        streams
            .add(macula_stream::StreamConfig::new("s", &["a.**"]))
            .await
            .expect("add");
        let mut reg = prometheus_client::registry::Registry::default();
        reg.register_collector(Box::new(StreamCollector {
            streams: streams.clone(),
        }));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encode");
        assert_eq!(text.matches("# TYPE ").count(), FAMILIES, "{text}");
        assert_eq!(text.matches("# HELP ").count(), FAMILIES, "{text}");
        assert!(
            text.contains("macula_stream_removed_total{stream=\"s\",reason=\"age\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("macula_stream_messages{stream=\"s\"} 0"),
            "{text}"
        );
        streams.shutdown().await;
    }
}
