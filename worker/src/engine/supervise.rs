//! The supervisor of one reader task: fencing by the lease deadline, killing on request.

use super::*;
use crate::fence::FenceEnd;

/// How a shard's supervisor task ended.
#[derive(Debug)]
pub(super) enum Outcome {
    /// The reader returned (stopped, or the shard ended) with its final progress.
    Finished(ShardProgress),
    /// The reader task panicked.
    Failed(String),
    /// Aborted because its lease could not be renewed in time.
    Fenced,
    /// Aborted on request (lease lost, or shutdown deadline).
    Killed,
}

/// Watches one reader: returns when it finishes, aborts it when its lease deadline passes
/// without renewal (fencing) or when told to, and tells the engine it is done.
pub(super) async fn supervise(
    mut reader: JoinHandle<ShardProgress>,
    fence: Fence,
    kill: CancellationToken,
    done: mpsc::UnboundedSender<(ShardKey, u64)>,
    key: (ShardKey, u64),
) -> Outcome {
    let outcome = tokio::select! {
            res = &mut reader => match res {
                Ok(p) => Outcome::Finished(p),
                Err(e) => Outcome::Failed(e.to_string()),
            },
            _ = kill.cancelled() => {
                reader.abort();
                let _ = (&mut reader).await;
                Outcome::Killed
            }
            end = fence.closed() => {
                reader.abort();
                let _ = (&mut reader).await;
                match end {
                    FenceEnd::Passed => Outcome::Fenced,
                    // The engine dropped us: never read without an owner watching.
                    FenceEnd::Dropped => Outcome::Killed,
                }
            }
    };
    let _ = done.send(key);
    outcome
}

#[cfg(test)]
mod tests {
    use super::super::readers::final_update;
    use super::super::test_support::ms;
    use super::*;

    /// A reader that runs until aborted, flagging when it is dropped.
    fn endless(dropped: Arc<std::sync::atomic::AtomicBool>) -> JoinHandle<ShardProgress> {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        tokio::spawn(async move {
            let _flag = Flag(dropped);
            futures::future::pending::<()>().await;
            ShardProgress::default()
        })
    }

    enum Poke {
        Nothing,
        ExtendEvery(u64),
        Kill,
        DropEngine,
    }

    /// (name, initial deadline ms, what the engine does, expected outcome, returns before ms)
    #[tokio::test]
    async fn supervise_table() {
        let cases: Vec<(&str, u64, Poke, &str, u64)> = vec![
            (
                "deadline passes without renewal: fenced",
                100,
                Poke::Nothing,
                "Fenced",
                1000,
            ),
            ("engine kills it", 10_000, Poke::Kill, "Killed", 1000),
            (
                "engine gone: never read unwatched",
                10_000,
                Poke::DropEngine,
                "Killed",
                1000,
            ),
            (
                "renewals keep it running until it is killed",
                100,
                Poke::ExtendEvery(30),
                "Killed",
                2000,
            ),
        ];
        for (name, initial, poke, want, bound) in cases {
            let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = endless(dropped.clone());
            let (dtx, drx) = Fence::new(BootInstant::now() + ms(initial));
            let kill = CancellationToken::new();
            let (done_tx, mut done_rx) = mpsc::unbounded_channel();
            let key = (ShardKey::new("s", "shard-0"), 7);
            let started = Instant::now();
            let sup = tokio::spawn(supervise(reader, drx, kill.clone(), done_tx, key.clone()));
            let mut dtx = Some(dtx);
            match poke {
                Poke::Nothing => {}
                Poke::Kill => kill.cancel(),
                Poke::DropEngine => drop(dtx.take()),
                Poke::ExtendEvery(every) => {
                    // Keep extending for 500ms (well past the initial deadline), then kill.
                    while started.elapsed() < ms(500) {
                        tokio::time::sleep(ms(every)).await;
                        if let Some(d) = &dtx {
                            let now = BootInstant::now();
                            assert!(d.extend(now + ms(100), now), "{name}: extended in time");
                        }
                        assert!(!sup.is_finished(), "{name}: stopped while renewed");
                    }
                    kill.cancel();
                }
            }
            let outcome = tokio::time::timeout(ms(bound), sup)
                .await
                .expect(name)
                .expect(name);
            let got = match outcome {
                Outcome::Finished(_) => "Finished",
                Outcome::Failed(_) => "Failed",
                Outcome::Fenced => "Fenced",
                Outcome::Killed => "Killed",
            };
            assert_eq!(got, want, "{name}");
            assert!(
                dropped.load(std::sync::atomic::Ordering::SeqCst),
                "{name}: reader must be gone"
            );
            assert_eq!(done_rx.recv().await, Some(key), "{name}: engine told");
        }
    }

    #[tokio::test]
    async fn supervise_reports_a_finished_reader() {
        let reader = tokio::spawn(async {
            ShardProgress {
                acked: Some(Position::whole("9")),
                ended: true,
                ..ShardProgress::default()
            }
        });
        let (_dtx, drx) = Fence::new(BootInstant::now() + ms(5000));
        let (done_tx, _done_rx) = mpsc::unbounded_channel();
        let out = supervise(
            reader,
            drx,
            CancellationToken::new(),
            done_tx,
            (ShardKey::new("s", "x"), 1),
        )
        .await;
        match out {
            Outcome::Finished(p) => {
                assert!(p.ended);
                assert_eq!(final_update(&p).position, Some(Position::whole("9")));
                assert!(final_update(&p).ended);
            }
            other => panic!("{other:?}"),
        }
    }
}
