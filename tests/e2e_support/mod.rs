//! What the real-cluster e2e suite stands on: the gate that decides whether it runs, the
//! user's tools (`helm`, `kubectl`) pointed at the cluster, the AWS emulators' environment,
//! waiting, and the kubelet stand-in ([`kubelet`]).
#![allow(dead_code)] // each test crate uses a different part

pub mod kubelet;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why the suite does not run here, or `None` when it must run. Running needs an explicit
/// `KCG_E2E=1`: the suite registers a fake Node and runs pods as local processes, so it must
/// only ever see a disposable cluster, never the one a developer's `KUBECONFIG` names.
pub fn skip_reason() -> Option<String> {
    if std::env::var("KCG_E2E").as_deref() != Ok("1") {
        return Some(
            "KCG_E2E is not 1. The e2e suite needs a disposable Kubernetes control plane: \
             scripts/test.sh starts one with ../shared/kube/cluster.sh and sets KCG_E2E=1 and \
             KUBECONFIG (it registers a fake node and runs pods as local processes: never point \
             it at a real cluster)"
                .into(),
        );
    }
    None
}

/// Everything a flow needs: the admin client (the test's own view, never the operator's),
/// the tools a user types, the emulators, the binaries.
pub struct Env {
    /// Admin client from `KUBECONFIG`.
    pub client: Client,
    /// The admin kubeconfig (what the user's `kubectl` and `helm` use).
    pub kubeconfig: PathBuf,
    /// `helm` (`HELM`, else on PATH).
    pub helm: PathBuf,
    /// `kubectl` (`KUBECTL`, else on PATH).
    pub kubectl: PathBuf,
    /// The AWS variables every pod gets from the "node", the way IRSA injects credentials:
    /// endpoints of the emulators, test credentials, region.
    pub aws_env: Vec<(String, String)>,
    /// `target/debug` (or `CARGO_TARGET_DIR`'s), where `kcg-worker` and `kcg-operator` are.
    pub bin_dir: PathBuf,
}

impl Env {
    /// Connects, or panics with what is missing: once `KCG_E2E=1` says a cluster is there,
    /// anything missing is a failure, not a skip.
    pub async fn connect() -> Env {
        let kubeconfig = PathBuf::from(
            std::env::var("KUBECONFIG").expect("KCG_E2E=1 needs KUBECONFIG (the local cluster)"),
        );
        let server = kubelet::KubeletOptions::from_kubeconfig(&kubeconfig, ".")
            .map(|o| o.api_server)
            .unwrap_or_default();
        assert!(
            server.starts_with("https://127.0.0.1:") || server.starts_with("https://localhost:"),
            "KUBECONFIG names {server:?}, not a local test cluster: the kubelet stand-in would bind \
             every pending pod of that cluster to a fake node"
        );
        let client = Client::try_default()
            .await
            .expect("KUBECONFIG is set but gives no client");
        tokio::time::timeout(Duration::from_secs(20), client.apiserver_version())
            .await
            .expect("the API server did not answer within 20 s")
            .expect("the API server answered with an error");
        let tool = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(name))
        };
        let mut aws_env = Vec::new();
        for var in [
            "AWS_ENDPOINT_URL_DYNAMODB",
            "AWS_ENDPOINT_URL_KINESIS",
            "AWS_ENDPOINT_URL_STS",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_REGION",
        ] {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => aws_env.push((var.to_owned(), v)),
                _ if var == "AWS_ENDPOINT_URL_STS" => {}
                _ => panic!(
                    "{var} is not set: start the emulators (eval \"$(scripts/emulators.sh env)\")"
                ),
            }
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root().join("target"));
        let bin_dir = target.join("debug");
        for bin in ["kcg-worker", "kcg-operator"] {
            assert!(
                bin_dir.join(bin).exists(),
                "{} is missing: run scripts/build-bins.sh",
                bin_dir.join(bin).display()
            );
        }
        Env {
            client,
            kubeconfig,
            helm: tool("HELM", "helm"),
            kubectl: tool("KUBECTL", "kubectl"),
            aws_env,
            bin_dir,
        }
    }

    /// Runs `kubectl ARGS` as the cluster admin (the user), returning stdout or an error
    /// with stderr.
    pub async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.run(&self.kubectl, args, None).await
    }

    /// `kubectl ARGS` with `input` on stdin (`kubectl apply -f -`).
    pub async fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String, String> {
        self.run(&self.kubectl, args, Some(input)).await
    }

    /// Runs `helm ARGS` as the cluster admin.
    pub async fn helm(&self, args: &[&str]) -> Result<String, String> {
        self.run(&self.helm, args, None).await
    }

    async fn run(
        &self,
        program: &Path,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let shown = format!(
            "{} {}",
            program.file_name().unwrap_or_default().to_string_lossy(),
            args.join(" ")
        );
        println!("  $ {shown}");
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(root())
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(if input.is_some() {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| format!("{shown}: {e}"))?;
        if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .await
                .map_err(|e| format!("{shown}: writing stdin: {e}"))?;
        }
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .map_err(|_| format!("{shown}: no answer within 120 s"))?
            .map_err(|e| format!("{shown}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{shown} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            ))
        }
    }
}

/// How long a wait may take before the flow fails.
pub const WAIT: Duration = Duration::from_secs(90);

/// Polls `probe` every 500 ms until it returns `Ok`, or fails after `limit` with `what` and
/// the probe's last word.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(last) if Instant::now() > deadline => {
                return Err(format!(
                    "timed out after {limit:?} waiting for {what}: {last}"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// [`wait_until`] for probes that answer `None` while not there yet; panics after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until(what, WAIT, || {
        let next = probe();
        async move { next.await.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
