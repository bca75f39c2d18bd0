//! The facade's one error type: pub/sub, RPC and flush failures all come
//! back as `macula::Error`, each with a stable `kind()`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use macula::{Error, HandlerResult, Node, Request, RpcError};

async fn node() -> Node {
    Node::builder()
        .realm("test.errors")
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .start()
        .await
        .expect("node starts")
}

async fn echo(req: Request) -> HandlerResult {
    Ok(req.payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_is_a_macula_error_with_a_kind() {
    let n = node().await;

    // RPC: the call goes through the facade's CallBuilder.
    let err = n
        .call("nobody.serves.this", Bytes::new())
        .timeout(Duration::from_millis(300))
        .retries(0)
        .await
        .expect_err("no provider");
    assert!(
        matches!(err.kind(), "rpc.no_providers" | "rpc.timeout"),
        "{err} is {}",
        err.kind()
    );
    assert!(err.as_rpc().is_some() && err.as_pubsub().is_none());

    let reg = n.advertise("echo.one", echo).await.expect("advertise");
    let again = n.advertise("echo.one", echo).await.expect_err("twice");
    assert_eq!(again.kind(), "rpc.already_advertised");
    assert!(matches!(
        again,
        Error::Rpc(RpcError::AlreadyAdvertised { .. })
    ));
    let reply = n
        .call("echo.one", "hi")
        .timeout(Duration::from_secs(5))
        .await
        .expect("a local call");
    assert_eq!(reply.payload, Bytes::from("hi"));
    drop(reg);
    let bad = n
        .call("not a name", Bytes::new())
        .await
        .expect_err("invalid");
    assert_eq!(bad.kind(), "rpc.invalid_procedure");

    // Pub/sub.
    let err = n.publish("bad..topic", "x").await.expect_err("invalid");
    assert_eq!(err.kind(), "pubsub.invalid_topic");
    assert!(err.as_pubsub().is_some());

    // Flush: nothing pending on a node alone.
    n.publish("fine.topic", "x").await.expect("publish");
    n.flush(Duration::from_secs(5)).await.expect("flushed");
    n.flush_acked(Duration::from_secs(5)).await.expect("acked");
    n.shutdown().await;
}

#[tokio::test]
async fn api_keys_without_a_realm_authority_are_a_config_error() {
    use macula::apikey::{ApiKey, ApiKeyLimits, ApiKeyStore};
    let key = ApiKey::generate().expect("key");
    let err = Node::builder()
        .listen(SocketAddr::from(([127, 0, 0, 1], 0)))
        .api_keys(
            ApiKeyStore::from_keys([(&key, vec![1])]),
            ApiKeyLimits::default(),
        )
        .start()
        .await
        .expect_err("no authority");
    assert_eq!(err.kind(), "config", "{err}");
    assert!(err.to_string().contains("api_keys"), "{err}");
}
