//! Starting real `kcg-worker` processes against the emulators, shared by the tests that
//! run processes.
#![allow(dead_code)] // each test binary uses a subset

use std::path::Path;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_dynamodb::config::Credentials;
use tokio::process::Command;

pub mod fleet;

/// The `kcg-worker` binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_kcg-worker");

/// `kcg-worker run` with `config` ([`fleet::run_command`]), with the emulators' region and
/// credentials pinned (a developer's own AWS settings cannot leak in), text logs at info,
/// killed on drop. The caller sets stdout and stderr.
pub fn emulator_command(config: &Path) -> Command {
    let mut cmd = Command::from(fleet::run_command(Path::new(BIN), config));
    cmd.env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("KCG_LOG_FORMAT", "text")
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    cmd
}

/// [`emulator_command`] as client `name` in pod `pod-<name>`.
pub fn worker_command(config: &Path, name: &str) -> Command {
    let mut cmd = emulator_command(config);
    cmd.args(["--client-id", name])
        .env("POD_NAME", format!("pod-{name}"));
    cmd
}

/// The SDK config of the test itself: endpoints from `AWS_ENDPOINT_URL_*`, region and
/// credentials pinned for the emulators.
pub async fn aws() -> aws_config::SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "static"))
        .load()
        .await
}

/// The libfaketime preload library `file` (`libfaketime.so.1`, or `libfaketimeMT.so.1` for
/// a multi-threaded process whose fake time changes while it runs), from the Debian
/// package `faketime` (`.ci/run` installs it). Preloaded into the worker itself: the
/// `faketime` command would stand between the test and the process it signals.
pub fn libfaketime(file: &str) -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .filter_map(Result::ok)
        .map(|d| d.path().join("faketime").join(file))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{file} is missing: apt-get install faketime"))
}
