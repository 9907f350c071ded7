//! A private ministack (Kinesis) with some of its module constants changed before it
//! starts: shorter shard iterator lifetimes (`ITERATOR_EXPIRY_SECONDS`), shorter
//! SubscribeToShard subscriptions (`SUBSCRIPTION_SECONDS`), so a test can outlive them in
//! seconds. Killed on drop. Used through `#[path]` by the reader and group tests.
#![allow(dead_code)]

use std::time::Duration;

use aws_config::{BehaviorVersion, SdkConfig};

/// A running private ministack.
pub struct PrivateMinistack {
    child: std::process::Child,
    cwd: std::path::PathBuf,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The SDK config pointing Kinesis at this instance.
    pub conf: SdkConfig,
}

impl PrivateMinistack {
    /// Starts one on a free loopback port with `settings` (names in
    /// `ministack.services.kinesis`, values in seconds), or returns `None` (with a printed
    /// reason) when `KCG_MINISTACK_PYTHON` (exported by `scripts/emulators.sh env`) is not
    /// set. Fails when it is set but ministack does not answer within 30 s.
    pub async fn start(test: &str, settings: &[(&str, f64)]) -> Option<Self> {
        let Ok(python) = std::env::var("KCG_MINISTACK_PYTHON") else {
            eprintln!(
                "SKIP {test}: KCG_MINISTACK_PYTHON is not set (eval \"$(scripts/emulators.sh env)\")"
            );
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        // ministack writes its state files to the working directory.
        let cwd = std::env::temp_dir().join(format!(
            "kcg-ministack-{test}-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&cwd).expect("temp dir");
        let mut script = String::from("import sys\nimport ministack.services.kinesis as kinesis\n");
        for (name, value) in settings {
            script.push_str(&format!("kinesis.{name} = {value:?}\n"));
        }
        script.push_str(
            "from ministack.app import main\nsys.argv = ['ministack']\nsys.exit(main())\n",
        );
        let child = std::process::Command::new(&python)
            .args(["-c", &script])
            .current_dir(&cwd)
            .env("BIND_HOST", "127.0.0.1")
            .env("GATEWAY_PORT", port.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start ministack with {python}: {e}"));
        let endpoint = format!("http://127.0.0.1:{port}");
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(&endpoint)
            .load()
            .await;
        let me = Self {
            child,
            cwd,
            endpoint,
            conf,
        };
        let client = aws_sdk_kinesis::Client::new(&me.conf);
        for _ in 0..300 {
            if client.list_streams().send().await.is_ok() {
                return Some(me);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the private ministack on port {port} did not answer within 30s");
    }
}

impl Drop for PrivateMinistack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.cwd);
    }
}
