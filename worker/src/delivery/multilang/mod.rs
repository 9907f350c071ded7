//! The `multiLang` sink: runs KCL MultiLangDaemon record processors unchanged. One child
//! process per owned shard speaks KCL's protocol (JSON lines on its stdin/stdout), so a
//! processor written on `amazon-kclpy` or `aws-kcl` runs under kcg as it ran under the Java
//! daemon.
//!
//! - The processor's checkpoints are the shard's checkpoints (the [`CommitTracker`]'s
//!   committed position): without checkpoint calls nothing is checkpointed, as in KCL.
//! - A processor that exits or breaks the protocol is killed; the reader then redelivers
//!   after the last checkpoint to a new process (after a backoff), so nothing is skipped.
//! - Shard end: `shardEnded`; the shard counts as ended only once the processor checkpointed
//!   it, otherwise it is asked again (the children wait), as KCL does.
//! - Graceful stop (release on rebalance, shutdown): `shutdownRequested`, its checkpoints are
//!   written with the release. Lease lost (the reader is cut off): `leaseLost`.
//!
//! `messages` holds the wire shapes, `conversation` the pure protocol state machine,
//! `process` the child's I/O.

pub mod conversation;
pub mod messages;
pub mod process;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::Mutex;
use tracing::{Instrument, debug, info, warn};

use self::conversation::{Batch, Commit, Conversation, Step};
use self::messages::{Action, RecordMessage, ToProcessor};
use self::process::{ProcessError, ProcessorIo};
use super::{BatchHandler, CommitTracker, HandlerError, Record, ShardContext};
use crate::config::MultiLangSink as MultiLangConfig;

/// How long a process told `leaseLost` may take to answer before it is killed.
const LEASE_LOST_GRACE: Duration = Duration::from_secs(5);

/// The sink: makes one [`ShardProcessor`] per shard reader.
pub struct MultiLangSink {
    command: Arc<[String]>,
}

impl MultiLangSink {
    /// A sink running `config.command` per shard.
    pub fn new(config: &MultiLangConfig) -> Self {
        Self {
            command: config.command.clone().into(),
        }
    }
}

fn needs_a_shard() -> HandlerError {
    HandlerError::new("the multiLang sink delivers through a shard's own processor (open_shard)")
}

impl BatchHandler for MultiLangSink {
    /// Records reach processors only through [`BatchHandler::open_shard`]'s handler.
    fn handle<'a>(&'a self, _batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Err(needs_a_shard()) })
    }

    fn open_shard(&self, shard: ShardContext) -> Option<Arc<dyn BatchHandler>> {
        Some(Arc::new(ShardProcessor {
            command: self.command.clone(),
            shard,
            running: Mutex::new(None),
            // open_shard runs inside the reader's span (group, client, stream, shard).
            span: tracing::Span::current(),
        }))
    }
}

/// A live process and the state of its conversation.
struct Running {
    io: ProcessorIo,
    conv: Conversation,
}

/// One shard's record processor: started on first need, restarted (by the reader's
/// redelivery) after a failure.
pub struct ShardProcessor {
    command: Arc<[String]>,
    shard: ShardContext,
    running: Mutex<Option<Running>>,
    /// The reader's span, for what outlives it (the `leaseLost` conversation).
    span: tracing::Span,
}

impl ShardProcessor {
    /// The running process, started and initialized at the shard's checkpoint if needed.
    async fn ensure_running<'g>(
        &self,
        slot: &'g mut Option<Running>,
        commits: &CommitTracker,
    ) -> Result<&'g mut Running, ProcessError> {
        if let Some(running) = slot.take() {
            return Ok(slot.insert(running));
        }
        let io = ProcessorIo::spawn(&self.command, &self.shard.stream, &self.shard.shard_id)?;
        let checkpoint = commits.state().committed;
        let msg = ToProcessor::Initialize {
            shard_id: &self.shard.shard_id,
            sequence_number: checkpoint
                .as_ref()
                .map_or(self.shard.initial_position, |c| c.sequence.as_str()),
            sub_sequence_number: checkpoint
                .as_ref()
                .and_then(|c| c.sub_sequence)
                .unwrap_or(0),
        };
        let mut running = Running {
            io,
            conv: Conversation::new(checkpoint.clone()),
        };
        exchange(&mut running, &msg, None, commits).await?;
        Ok(slot.insert(running))
    }

    /// Runs `f` on the running process; on failure the process is killed and the error
    /// asks the reader to redeliver after the last checkpoint.
    async fn with_process<T>(
        &self,
        commits: &CommitTracker,
        what: Action,
        f: impl AsyncFnOnce(&mut Running) -> Result<T, ProcessError>,
    ) -> Result<T, HandlerError> {
        let mut slot = self.running.lock().await;
        let result = match self.ensure_running(&mut slot, commits).await {
            Ok(running) => f(running).await,
            Err(e) => Err(e),
        };
        result.map_err(|e| {
            if let Some(r) = slot.take() {
                tokio::spawn(r.io.kill().in_current_span());
            }
            warn!(error = %e, during = %what, "record processor failed; it is restarted and gets the records after the last checkpoint again");
            HandlerError::redeliver(format!(
                "record processor failed during {what}: {e}"
            ))
        })
    }
}

/// Sends `msg` and serves the processor's checkpoint requests until it answers `status`.
async fn exchange(
    running: &mut Running,
    msg: &ToProcessor<'_>,
    batch: Option<Batch>,
    commits: &CommitTracker,
) -> Result<(), ProcessError> {
    let Some(action) = msg.action() else {
        return Ok(());
    };
    running.conv.sent(action, batch)?;
    running.io.send(msg).await?;
    loop {
        let from = running.io.receive().await?;
        match running.conv.received(from)? {
            Step::Checkpoint { commit, reply } => {
                match commit {
                    Some(Commit::At(p)) => {
                        debug!(position = %p, "processor checkpoint");
                        commits.checkpoint_at(p);
                    }
                    Some(Commit::ShardEnd) => {
                        // Everything delivered is processed; the end flag itself is set by
                        // the reader once `shardEnded` is answered.
                        if let Some(d) = running.conv.delivered() {
                            commits.checkpoint_at(d.clone());
                        }
                        debug!("processor checkpointed the shard end");
                    }
                    None => {}
                }
                if let Some(error) = reply.error {
                    warn!(error, sequence = ?reply.sequence_number, "refused a checkpoint request");
                }
                running.io.send(&ToProcessor::Checkpoint(reply)).await?;
            }
            Step::Done(_) => return Ok(()),
        }
    }
}

/// Sequence numbers of the KPL aggregates in `batch` (their user records carry a
/// sub-sequence), each once.
fn aggregates(batch: &[Record]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in batch.iter().filter(|r| r.sub_sequence.is_some()) {
        if out.last() != Some(&r.sequence) {
            out.push(r.sequence.clone());
        }
    }
    out
}

impl BatchHandler for ShardProcessor {
    fn handle<'a>(&'a self, _batch: &'a [Record]) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async { Err(needs_a_shard()) })
    }

    /// `processRecords`; the processor's checkpoints move `commits` while it works.
    fn deliver<'a>(
        &'a self,
        batch: &'a [Record],
        commits: &'a CommitTracker,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
                return Ok(());
            };
            let millis_behind_latest = self.shard.progress.borrow().millis_behind;
            self.with_process(commits, Action::ProcessRecords, async |r| {
                let msg = ToProcessor::ProcessRecords {
                    records: batch.iter().map(RecordMessage::from).collect(),
                    millis_behind_latest,
                };
                let batch_info = Batch {
                    first: first.sequence.clone(),
                    last: last.position(),
                    aggregates: aggregates(batch),
                };
                exchange(r, &msg, Some(batch_info), commits).await
            })
            .await
        })
    }

    /// `shardEnded`: done only once the processor checkpointed the end; the process then
    /// gets EOF.
    fn end_shard<'a>(
        &'a self,
        commits: &'a CommitTracker,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let checkpointed = self
                .with_process(commits, Action::ShardEnded, async |r| {
                    exchange(r, &ToProcessor::ShardEnded, None, commits).await?;
                    Ok(r.conv.shard_end_checkpointed())
                })
                .await?;
            if !checkpointed {
                return Err(HandlerError::new(
                    "the record processor answered shardEnded without checkpointing; KCL requires checkpointer.checkpoint() in shardEnded, so the shard is not marked ended (its children wait) and shardEnded is sent again",
                ));
            }
            if let Some(r) = self.running.lock().await.take() {
                r.io.close().await;
            }
            info!("record processor checkpointed the shard end");
            Ok(())
        })
    }

    /// `shutdownRequested` (the processor may checkpoint), then EOF.
    fn stop_shard<'a>(&'a self, commits: &'a CommitTracker) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut slot = self.running.lock().await;
            let Some(mut r) = slot.take() else {
                return;
            };
            match exchange(&mut r, &ToProcessor::ShutdownRequested, None, commits).await {
                Ok(()) => r.io.close().await,
                Err(e) => {
                    warn!(error = %e, "record processor failed during shutdownRequested");
                    r.io.kill().await;
                }
            }
        })
    }
}

impl Drop for ShardProcessor {
    /// The reader was cut off (lease lost, fenced, or the shutdown bound passed): an idle
    /// processor is told `leaseLost` and gets EOF; one in the middle of a message is killed.
    fn drop(&mut self) {
        let Some(mut r) = self.running.get_mut().take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return; // no runtime: kill_on_drop ends the process
        };
        let _entered = self.span.enter();
        if !r.conv.idle() {
            warn!("reader stopped in the middle of a message; killing the record processor");
            rt.spawn(r.io.kill());
            return;
        }
        let commits = CommitTracker::new(None);
        rt.spawn(
            async move {
                let told = tokio::time::timeout(
                    LEASE_LOST_GRACE,
                    exchange(&mut r, &ToProcessor::LeaseLost, None, &commits),
                )
                .await;
                match told {
                    Ok(Ok(())) => r.io.close().await,
                    Ok(Err(e)) => {
                        warn!(error = %e, "record processor failed during leaseLost");
                        r.io.kill().await;
                    }
                    Err(_) => {
                        warn!("record processor did not answer leaseLost in time; killing it");
                        r.io.kill().await;
                    }
                }
            }
            .in_current_span(),
        );
    }
}
