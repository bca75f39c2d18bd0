//! One stream wherever it lives: hosted by this node (direct calls) or by
//! another node (over RPC, `remote.rs`). Applications get one from
//! `NodeRuntime::stream` / `ClientRuntime::stream`; a subscription reads
//! through it the same way in both cases.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use macula_stream::{AckPolicy, ConsumerConfig, DeliverPolicy};
use macula_wire::Millis;

use super::remote::{RemoteStream, DEFAULT_REMOTE_TIMEOUT};
use super::{
    AckKind, ConsumerReport, PersistOptions, PubAck, StreamError, StreamInfo, StreamMsg, Streams,
};

/// How long an operation on a replicated stream waits for a leader that
/// this member just became (or for news of one).
const OFFICE_PATIENCE: Duration = Duration::from_secs(5);
/// Messages one [`StreamSubscription::recv`] pulls at most.
const SUBSCRIPTION_BATCH: usize = 1000;
/// How long one pull of a subscription to a remote stream waits (below
/// the host's default `max_wait`).
const REMOTE_SUBSCRIPTION_WAIT: Duration = Duration::from_secs(20);

impl Streams {
    /// Reads a stream from `from` on, as messages come: an ephemeral
    /// consumer without acks (filtered by `filter`, empty for all) pulled in
    /// batches. Dropping the subscription removes the consumer (at the
    /// latest after its idle threshold).
    pub async fn subscribe(
        &self,
        stream: &str,
        filter: &[&str],
        from: DeliverPolicy,
    ) -> Result<StreamSubscription, StreamError> {
        self.handle(stream).subscribe(filter, from).await
    }

    /// Stream `name` of this node as a [`StreamHandle`].
    pub fn handle(&self, name: &str) -> StreamHandle {
        StreamHandle::Local {
            streams: self.clone(),
            name: name.to_string(),
        }
    }

    /// Where an operation on `name` goes when this node is a member of the
    /// replicated stream that does not serve it: the leader (`Some`), or
    /// here after waiting a moment for this member's office (`None`, also
    /// for every other stream).
    async fn elsewhere(&self, name: &str) -> Result<Option<RemoteStream>, StreamError> {
        let Some(r) = self.replica(name) else {
            return Ok(None);
        };
        if r.serving() {
            return Ok(None);
        }
        match (
            r.group.leader().filter(|_| !r.group.is_leader()),
            self.rpc(),
        ) {
            (Some(leader), Some(rpc)) => {
                self.count_forwarded();
                Ok(Some(RemoteStream::on_member(
                    rpc,
                    name,
                    leader,
                    DEFAULT_REMOTE_TIMEOUT,
                )))
            }
            _ => {
                r.wait_serving(OFFICE_PATIENCE).await;
                Ok(None)
            }
        }
    }

    /// How long one pull of a subscription waits.
    pub(crate) fn max_wait(&self) -> Duration {
        self.0.limits.max_wait
    }
}

/// A stream on this node or another (see the module docs).
#[derive(Clone, Debug)]
pub enum StreamHandle {
    /// Hosted here.
    Local {
        /// This node's streams.
        streams: Streams,
        /// The stream.
        name: String,
    },
    /// Hosted by another node.
    Remote(RemoteStream),
}

impl StreamHandle {
    /// The stream's name.
    pub fn name(&self) -> &str {
        match self {
            StreamHandle::Local { name, .. } => name,
            StreamHandle::Remote(r) => r.name(),
        }
    }

    /// An acknowledged publish on `topic`, which this stream must capture:
    /// answered once the message is stored (on disk) by the stream's node.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        opts: PersistOptions,
    ) -> Result<PubAck, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => {
                if let Some(r) = streams.elsewhere(name).await? {
                    return r.publish(topic, payload, opts).await;
                }
                streams.publish_on(name, topic, payload, opts).await
            }
            StreamHandle::Remote(r) => r.publish(topic, payload, opts).await,
        }
    }

    /// One stored message (`None`: not stored, or not durable yet).
    pub async fn get_msg(&self, seq: u64) -> Result<Option<StreamMsg>, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.get_msg(seq).await,
                None => streams.get_msg(name, seq).await,
            },
            StreamHandle::Remote(r) => r.get_msg(seq).await,
        }
    }

    /// The stream's state.
    pub async fn info(&self) -> Result<StreamInfo, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.info().await,
                None => streams.info(name),
            },
            StreamHandle::Remote(r) => r.info().await,
        }
    }

    /// Adds a consumer; its name (ephemeral ones get `eph-<n>`).
    pub async fn add_consumer(&self, cfg: ConsumerConfig) -> Result<String, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.add_consumer(cfg).await,
                None => streams.add_consumer(name, cfg).await,
            },
            StreamHandle::Remote(r) => r.add_consumer(cfg).await,
        }
    }

    /// Removes a consumer.
    pub async fn delete_consumer(&self, consumer: &str) -> Result<(), StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.delete_consumer(consumer).await,
                None => streams.delete_consumer(name, consumer).await,
            },
            StreamHandle::Remote(r) => r.delete_consumer(consumer).await,
        }
    }

    /// A consumer's state.
    pub async fn consumer_info(&self, consumer: &str) -> Result<ConsumerReport, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.consumer_info(consumer).await,
                None => streams.consumer_info(name, consumer),
            },
            StreamHandle::Remote(r) => r.consumer_info(consumer).await,
        }
    }

    /// The stream's consumers.
    pub async fn consumers(&self) -> Result<Vec<ConsumerReport>, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.consumers().await,
                None => streams.consumers(name),
            },
            StreamHandle::Remote(r) => r.consumers().await,
        }
    }

    /// Pulls up to `batch` messages (and `max_bytes`), waiting up to `wait`
    /// for the first; empty when none came in time.
    pub async fn next(
        &self,
        consumer: &str,
        batch: usize,
        max_bytes: Option<u64>,
        wait: Duration,
    ) -> Result<Vec<StreamMsg>, StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.next(consumer, batch, max_bytes, wait).await,
                None => streams.next(name, consumer, batch, max_bytes, wait).await,
            },
            StreamHandle::Remote(r) => r.next(consumer, batch, max_bytes, wait).await,
        }
    }

    /// Acknowledges (or naks, ...) a delivered message.
    pub async fn ack(&self, consumer: &str, seq: u64, kind: AckKind) -> Result<(), StreamError> {
        match self {
            StreamHandle::Local { streams, name } => match streams.elsewhere(name).await? {
                Some(r) => r.ack(consumer, seq, kind).await,
                None => streams.ack(name, consumer, seq, kind).await,
            },
            StreamHandle::Remote(r) => r.ack(consumer, seq, kind).await,
        }
    }

    /// Reads the stream from `from` on, as messages come: an ephemeral
    /// consumer without acks (filtered by `filter`, empty for all) pulled in
    /// batches. Dropping the subscription removes the consumer (at the
    /// latest after its idle threshold, if the stream's node is out of
    /// reach then).
    pub async fn subscribe(
        &self,
        filter: &[&str],
        from: DeliverPolicy,
    ) -> Result<StreamSubscription, StreamError> {
        let wait = match self {
            StreamHandle::Local { streams, .. } => streams.max_wait(),
            StreamHandle::Remote(_) => REMOTE_SUBSCRIPTION_WAIT,
        };
        let cfg = ConsumerConfig {
            deliver: from,
            ack: AckPolicy::None,
            filter: filter.iter().map(|f| f.to_string()).collect(),
            inactive_threshold: Millis::from_duration(wait * 2),
            ..Default::default()
        };
        let consumer = self.add_consumer(cfg).await?;
        Ok(StreamSubscription {
            handle: self.clone(),
            consumer,
            wait,
            buffered: VecDeque::new(),
        })
    }
}

/// A stream read from a position on (see [`StreamHandle::subscribe`]).
pub struct StreamSubscription {
    handle: StreamHandle,
    consumer: String,
    wait: Duration,
    buffered: VecDeque<StreamMsg>,
}

impl std::fmt::Debug for StreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSubscription")
            .field("stream", &self.handle.name())
            .field("consumer", &self.consumer)
            .finish()
    }
}

impl StreamSubscription {
    /// The next message, waiting for one; an error when the stream or its
    /// consumer went away (or, for a remote stream, its node cannot be
    /// reached).
    pub async fn recv(&mut self) -> Result<StreamMsg, StreamError> {
        loop {
            if let Some(m) = self.buffered.pop_front() {
                return Ok(m);
            }
            let got = self
                .handle
                .next(&self.consumer, SUBSCRIPTION_BATCH, None, self.wait)
                .await?;
            self.buffered.extend(got);
        }
    }

    /// The ephemeral consumer's name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }
}

impl Drop for StreamSubscription {
    fn drop(&mut self) {
        let handle = self.handle.clone();
        let consumer = std::mem::take(&mut self.consumer);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = handle.delete_consumer(&consumer).await;
            });
        }
    }
}
