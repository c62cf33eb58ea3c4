//! The worker loop of one stage: pull one message at a time from the stage's durable consumer,
//! run the handler, keep the message alive with progress acks while it runs, then ack, terminate
//! or nak it with a delay. Several workers (threads, processes or hosts) on one durable consumer
//! share the work, because each pulls only one message at a time.

use super::messages::{DecodeError, Message, decode};
use super::{Bus, BusError, Stage, nats_err};
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use futures::StreamExt;
use std::future::Future;
use std::time::Duration;

/// Redelivery policy of a stage's consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before redelivery: the n-th entry after the n-th delivery was not acked (crash) or
    /// was nak'ed (transient error). The server uses the first entry as the ack wait.
    pub backoff: Vec<Duration>,
    /// Ack wait when `backoff` is empty.
    pub ack_wait: Duration,
    /// Deliveries in total, the first included; must exceed `backoff.len()`.
    pub max_deliver: i64,
}

impl Default for RetryPolicy {
    /// A worker that dies is noticed after 30 s; a transient error is retried after 30 s, 1 min
    /// and 5 min, then the build fails.
    fn default() -> Self {
        RetryPolicy {
            backoff: vec![
                Duration::from_secs(30),
                Duration::from_secs(60),
                Duration::from_secs(300),
            ],
            ack_wait: Duration::from_secs(30),
            max_deliver: 4,
        }
    }
}

impl RetryPolicy {
    /// The default policy's shape with another ack wait and delivery bound: a worker that dies
    /// is noticed after `ack_wait`; a failed attempt is retried after 1×, 2× and 10× `ack_wait`
    /// (as many of those as `max_deliver` leaves room for; none when it is -1, unlimited,
    /// because the server wants max_deliver above the number of backoff values).
    /// `kiln up`/`kiln worker --ack-wait SECS --max-deliver N` build theirs with it.
    pub fn scaled(ack_wait: Duration, max_deliver: i64) -> RetryPolicy {
        let steps = usize::try_from(max_deliver.saturating_sub(1))
            .unwrap_or(0)
            .min(3);
        RetryPolicy {
            backoff: [1, 2, 10]
                .into_iter()
                .take(steps)
                .map(|k| ack_wait.saturating_mul(k))
                .collect(),
            ack_wait,
            max_deliver,
        }
    }

    /// The ack wait the server applies to a first delivery.
    pub fn ack_wait(&self) -> Duration {
        self.backoff.first().copied().unwrap_or(self.ack_wait)
    }

    /// How often a running handler's message gets a progress ack: a third of the shortest wait.
    pub fn progress_interval(&self) -> Duration {
        let shortest = self
            .backoff
            .iter()
            .copied()
            .chain([self.ack_wait])
            .min()
            .unwrap_or(self.ack_wait);
        (shortest / 3).max(Duration::from_millis(50))
    }

    /// Delay before redelivering after failed attempt number `attempt` (1-based).
    pub fn nak_delay(&self, attempt: u64) -> Option<Duration> {
        let i = (attempt.max(1) - 1) as usize;
        self.backoff.get(i).or(self.backoff.last()).copied()
    }

    /// Check what the server would reject.
    pub fn check(&self) -> Result<(), BusError> {
        let bad = |message: String| BusError::Nats {
            what: "use this retry policy".into(),
            message,
        };
        if !self.backoff.is_empty() && self.max_deliver <= self.backoff.len() as i64 {
            return Err(bad(format!(
                "max_deliver ({}) must exceed the number of backoff values ({})",
                self.max_deliver,
                self.backoff.len()
            )));
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            return Err(bad(format!(
                "max_deliver must be positive or -1 (unlimited), not {}",
                self.max_deliver
            )));
        }
        if self.ack_wait.is_zero() || self.backoff.iter().any(|d| d.is_zero()) {
            return Err(bad("ack_wait and backoff values must be above zero".into()));
        }
        Ok(())
    }
}

/// What the handler made of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Handled (the handler published `completed`): ack.
    Done,
    /// Will never succeed (a recipe error, an unreadable message; the handler published
    /// `failed`): terminate, no redelivery.
    Final,
}

/// What the worker did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Acked,
    Terminated,
    /// Nak'ed after a handler error; will be redelivered.
    Retrying,
    /// Handler error on the last attempt: terminated.
    GaveUp,
}

/// One delivery of a message to a handler.
#[derive(Debug, Clone)]
pub struct Delivery {
    message: jetstream::Message,
    attempt: u64,
    max_deliver: i64,
    stream_sequence: u64,
}

impl Delivery {
    pub fn subject(&self) -> &str {
        self.message.subject.as_str()
    }

    pub fn payload(&self) -> &[u8] {
        &self.message.payload
    }

    /// Read the payload as a message (checks required fields and `v`).
    pub fn decode<M: Message>(&self) -> Result<M, DecodeError> {
        decode(self.payload())
    }

    /// 1 for the first delivery.
    pub fn attempt(&self) -> u64 {
        self.attempt
    }

    /// True when a handler error now will not be retried: publish `failed`.
    pub fn is_last_attempt(&self) -> bool {
        self.max_deliver > 0 && self.attempt >= self.max_deliver as u64
    }

    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// The underlying JetStream message (for headers).
    pub fn message(&self) -> &jetstream::Message {
        &self.message
    }
}

/// How long a stopping worker lets the message in hand finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// A stage worker bound to the stage's durable consumer.
#[derive(Debug, Clone)]
pub struct Worker {
    consumer: PullConsumer,
    policy: RetryPolicy,
    stage: Stage,
}

impl Worker {
    /// Create (idempotently) the stage's consumer and bind to it.
    pub async fn new(bus: &Bus, stage: Stage, policy: RetryPolicy) -> Result<Worker, BusError> {
        let consumer = bus.ensure_consumer(stage, &policy).await?;
        Ok(Worker {
            consumer,
            policy,
            stage,
        })
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    /// Pull one message, waiting up to `wait`; `None` when none came.
    pub async fn next_message(
        &self,
        wait: Duration,
    ) -> Result<Option<jetstream::Message>, BusError> {
        let what = || format!("pull from consumer {}", self.stage.consumer_name());
        let mut batch = self
            .consumer
            .batch()
            .max_messages(1)
            .expires(wait)
            .messages()
            .await
            .map_err(nats_err(what()))?;
        match batch.next().await {
            None => Ok(None),
            Some(Ok(m)) => Ok(Some(m)),
            Some(Err(e)) => Err(nats_err(what())(e)),
        }
    }

    /// Run `handler` on one message: progress acks while it runs, then ack (`Done`), terminate
    /// (`Final`, or an error on the last attempt) or nak with the policy's delay (an error).
    pub async fn handle<F, Fut, E>(
        &self,
        message: jetstream::Message,
        handler: &F,
    ) -> Result<Handled, BusError>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<Outcome, E>>,
        E: std::fmt::Display,
    {
        let (attempt, stream_sequence) = match message.info() {
            Ok(i) => (i.delivered.max(1) as u64, i.stream_sequence),
            Err(_) => (1, 0),
        };
        let delivery = Delivery {
            message: message.clone(),
            attempt,
            max_deliver: self.policy.max_deliver,
            stream_sequence,
        };
        let last = delivery.is_last_attempt();
        let period = self.policy.progress_interval();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let work = handler(delivery);
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = ticks.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        tracing::warn!(stage = %self.stage, "progress ack failed: {e}");
                    }
                }
            }
        };
        let what = |k: &str| {
            format!(
                "{k} message {stream_sequence} on consumer {}",
                self.stage.consumer_name()
            )
        };
        match result {
            Ok(Outcome::Done) => {
                message.double_ack().await.map_err(nats_err(what("ack")))?;
                Ok(Handled::Acked)
            }
            Ok(Outcome::Final) => {
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(nats_err(what("terminate")))?;
                Ok(Handled::Terminated)
            }
            Err(e) if last => {
                tracing::warn!(stage = %self.stage, attempt, "giving up: {e}");
                message
                    .ack_with(AckKind::Term)
                    .await
                    .map_err(nats_err(what("terminate")))?;
                Ok(Handled::GaveUp)
            }
            Err(e) => {
                let delay = self.policy.nak_delay(attempt);
                tracing::info!(stage = %self.stage, attempt, ?delay, "will retry: {e}");
                message
                    .ack_with(AckKind::Nak(delay))
                    .await
                    .map_err(nats_err(what("nak")))?;
                Ok(Handled::Retrying)
            }
        }
    }

    /// Pull and handle one message; `None` when none came within `wait`.
    pub async fn process_one<F, Fut, E>(
        &self,
        handler: &F,
        wait: Duration,
    ) -> Result<Option<Handled>, BusError>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<Outcome, E>>,
        E: std::fmt::Display,
    {
        match self.next_message(wait).await? {
            None => Ok(None),
            Some(m) => self.handle(m, handler).await.map(Some),
        }
    }

    /// Handle messages until `shutdown` completes. A handler running then gets
    /// [`SHUTDOWN_GRACE`] to finish; after that its message is left unacknowledged (the server
    /// redelivers it after ack_wait), so a worker stops within seconds even in a long stage.
    /// Connection errors are logged and retried (the client reconnects by itself).
    pub async fn run<F, Fut, E, S>(&self, handler: F, shutdown: S) -> Result<(), BusError>
    where
        F: Fn(Delivery) -> Fut,
        Fut: Future<Output = Result<Outcome, E>>,
        E: std::fmt::Display,
        S: Future<Output = ()>,
    {
        tokio::pin!(shutdown);
        loop {
            let next = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                m = self.next_message(Duration::from_secs(5)) => m,
            };
            match next {
                Ok(None) => {}
                Ok(Some(m)) => {
                    let handled = self.handle(m, &handler);
                    tokio::pin!(handled);
                    tokio::select! {
                        r = &mut handled => {
                            if let Err(e) = r {
                                tracing::warn!(stage = %self.stage, "{}", crate::error::Chain(&e));
                            }
                        }
                        _ = &mut shutdown => {
                            // A stage may run for minutes (a boot, a kernel build): give it a
                            // moment, then stop without acking; the server redelivers the
                            // message to another worker after ack_wait.
                            match tokio::time::timeout(SHUTDOWN_GRACE, &mut handled).await {
                                Ok(Err(e)) => tracing::warn!(stage = %self.stage, "{e}"),
                                Ok(Ok(_)) => {}
                                Err(_) => tracing::warn!(
                                    stage = %self.stage,
                                    "stopping in the middle of a message; it is redelivered \
                                     to another worker"
                                ),
                            }
                            return Ok(());
                        }
                    }
                }
                Err(e) => {
                    let text = crate::error::chain_text(&e);
                    if super::cluster::is_unavailable(&text) {
                        tracing::warn!(
                            stage = %self.stage,
                            "{text}: no JetStream quorum for stream {} or its consumer {}? (a majority of the NATS cluster's nodes that hold them must be up: see `kiln status --cluster`); retrying in 1 s",
                            super::STREAM,
                            self.stage.consumer_name()
                        );
                    } else {
                        tracing::warn!(stage = %self.stage, "{text}; retrying in 1 s");
                    }
                    tokio::select! {
                        _ = &mut shutdown => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaled_policies_are_valid_for_the_server() {
        let s = Duration::from_secs;
        let p = RetryPolicy::scaled(s(2), 4);
        assert_eq!(p.backoff, [s(2), s(4), s(20)]);
        assert_eq!(p.ack_wait(), s(2));
        assert!(p.check().is_ok());
        let p = RetryPolicy::scaled(s(3), 2);
        assert_eq!(p.backoff, [s(3)]);
        assert!(p.check().is_ok());
        let p = RetryPolicy::scaled(s(3), 1);
        assert!(p.backoff.is_empty());
        assert_eq!(p.ack_wait(), s(3));
        assert!(p.check().is_ok());
        let p = RetryPolicy::scaled(s(1), -1);
        assert!(p.backoff.is_empty());
        assert!(p.check().is_ok());
        assert!(RetryPolicy::scaled(s(1), 0).check().is_err());
        assert!(RetryPolicy::scaled(Duration::ZERO, 3).check().is_err());
    }
}
