//! One record-processor child process: JSON lines on its stdin/stdout, its stderr forwarded
//! to the worker log. Thin I/O; what the lines mean is decided in `conversation.rs`.

use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tracing::{Instrument, info, warn};

use super::messages::{BadMessage, FromProcessor, Line, parse_line};

/// Why talking to the processor failed. Any of these ends the process (it is restarted).
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The command could not be started.
    #[error("could not start the record processor {command:?}: {source}")]
    Spawn {
        /// The configured command.
        command: Vec<String>,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing to its stdin failed (it has most likely exited).
    #[error("could not write to the record processor (pid {pid:?}): {source}")]
    Write {
        /// Its pid.
        pid: Option<u32>,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Reading its stdout failed.
    #[error("could not read from the record processor (pid {pid:?}): {source}")]
    Read {
        /// Its pid.
        pid: Option<u32>,
        /// The I/O error.
        source: std::io::Error,
    },
    /// It closed its stdout (exited) while kcg waited for an answer.
    #[error("the record processor (pid {pid:?}) exited: {status}")]
    Exited {
        /// Its pid.
        pid: Option<u32>,
        /// Its exit status, as far as known.
        status: String,
    },
    /// It wrote a malformed message.
    #[error(transparent)]
    BadMessage(#[from] BadMessage),
    /// It broke the protocol.
    #[error(transparent)]
    Protocol(#[from] super::conversation::ProtocolError),
}

/// How long a process that got EOF on stdin may take to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// A running record processor.
pub struct ProcessorIo {
    child: Child,
    pid: Option<u32>,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl ProcessorIo {
    /// Starts `command` (program and arguments, no shell) with piped stdin/stdout; its
    /// stderr lines are logged with the current span (group, stream, shard) and `stream` /
    /// `shard` fields. Killed when dropped.
    pub fn spawn(command: &[String], stream: &str, shard: &str) -> Result<Self, ProcessError> {
        let spawn_error = |source| ProcessError::Spawn {
            command: command.to_vec(),
            source,
        };
        let (program, args) = command
            .split_first()
            .ok_or_else(|| spawn_error(std::io::Error::other("empty command")))?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_error)?;
        let pid = child.id();
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(spawn_error(std::io::Error::other("stdio not piped")));
        };
        let (stream, shard) = (stream.to_owned(), shard.to_owned());
        tokio::spawn(
            async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    info!(%stream, %shard, pid, "processor stderr: {line}");
                }
            }
            .instrument(tracing::Span::current()),
        );
        info!(?pid, "record processor started");
        Ok(Self {
            child,
            pid,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
        })
    }

    /// Writes one message as a JSON line.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), ProcessError> {
        let write_error = |source| ProcessError::Write {
            pid: self.pid,
            source,
        };
        let mut line = serde_json::to_vec(msg).map_err(|e| write_error(e.into()))?;
        line.push(b'\n');
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| write_error(std::io::ErrorKind::BrokenPipe.into()))?;
        stdin.write_all(&line).await.map_err(write_error)?;
        stdin.flush().await.map_err(write_error)
    }

    /// The next protocol message; the processor's own output lines are logged and skipped.
    pub async fn receive(&mut self) -> Result<FromProcessor, ProcessError> {
        loop {
            let line = self
                .stdout
                .next_line()
                .await
                .map_err(|source| ProcessError::Read {
                    pid: self.pid,
                    source,
                })?;
            let Some(line) = line else {
                return Err(ProcessError::Exited {
                    pid: self.pid,
                    status: self.exit_status().await,
                });
            };
            match parse_line(&line)? {
                Line::Blank => {}
                Line::Output(text) => info!(pid = self.pid, "processor stdout: {text}"),
                Line::Message(m) => return Ok(m),
            }
        }
    }

    /// Its exit status once it closed stdout (waits briefly, then kills it).
    async fn exit_status(&mut self) -> String {
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => status.to_string(),
            Ok(Err(e)) => format!("unknown ({e})"),
            Err(_) => {
                let _ = self.child.start_kill();
                "closed its stdout but did not exit; killed".to_owned()
            }
        }
    }

    /// Closes its stdin (both libraries end their loop on EOF) and waits for it to exit,
    /// killing it after a short grace.
    pub async fn close(mut self) {
        drop(self.stdin.take());
        match tokio::time::timeout(EXIT_GRACE, self.child.wait()).await {
            Ok(Ok(status)) => info!(pid = self.pid, %status, "record processor exited"),
            Ok(Err(e)) => {
                warn!(pid = self.pid, error = %e, "waiting for the record processor failed")
            }
            Err(_) => {
                warn!(
                    pid = self.pid,
                    "record processor did not exit on EOF; killing it"
                );
                let _ = self.child.kill().await;
            }
        }
    }

    /// Kills it at once (it broke the protocol, or kcg gives up on it).
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
