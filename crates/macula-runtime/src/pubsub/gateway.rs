//! The gateway's side of attached clients' feeds. The core matches a
//! client's patterns and queues its events straight to the client's data
//! stream (original publisher, epoch and sequence number, in the order this
//! node received them); `crate::gateway` holds one `FeedId` per client.

use macula_pubsub::{FeedId, Interest};
use macula_wire::NodeId;

use super::{PubSub, PubSubError};

impl PubSub {
    /// A new feed for attached client `client`.
    pub(crate) fn open_feed(&self, client: NodeId) -> FeedId {
        self.0.core().open_feed(client)
    }

    /// Patterns `feed` is subscribed to.
    pub(crate) fn feed_patterns(&self, feed: FeedId) -> Vec<String> {
        self.0.core().feed_patterns(feed)
    }

    /// Ends `feed` (its client left): every pattern is removed, the
    /// interest records are updated in the background.
    pub(crate) fn close_feed(&self, feed: FeedId) {
        self.run(|core, _, _| core.close_feed(feed));
    }

    /// Subscribes `feed` to `pattern` (idempotent) and registers the
    /// interest in the mesh before returning, like `subscribe_mesh`.
    pub(crate) async fn feed_add(&self, feed: FeedId, pattern: &str) -> Result<(), PubSubError> {
        let interest = self.run(|core, _, _| core.feed_add(feed, pattern));
        if let Err(reason) = self.announce(interest?).await {
            self.feed_remove(feed, pattern).await;
            let pattern = pattern.to_string();
            return Err(PubSubError::Interest { pattern, reason });
        }
        Ok(())
    }

    /// Unsubscribes `feed` from `pattern` and updates the interest record.
    pub(crate) async fn feed_remove(&self, feed: FeedId, pattern: &str) {
        let interest = self.run(|core, _, _| core.feed_remove(feed, pattern));
        if interest != Interest::None {
            if let Err(e) = self.announce(interest).await {
                tracing::debug!(pattern, error = %e, "could not update interest after a client unsubscribed");
            }
        }
    }
}
