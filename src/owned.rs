//! Writing one owned object (the group's ConfigMap or Deployment): server-side applied
//! only when [`crate::apply::decide`] says so, never over an object the group does not own.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::{debug, info};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::ResourceExt;
use kube::api::DeleteParams;

use crate::api_problem;
use crate::apply::{self, Decision};
use crate::controller::{Context, Error, FIELD_MANAGER};
use crate::crd::KinesisConsumerGroup;
use crate::disruption::{self, PdbAction};
use crate::metrics::Metrics;
use crate::resources;
use crate::status::Problem;

/// What became of one owned object.
#[derive(Debug)]
pub enum Outcome<K> {
    /// Applied; the object as stored.
    Applied(K),
    /// Already as rendered; the object as observed.
    UpToDate(K),
    /// The name is taken by an object the group does not own; it was left alone.
    NotOwned,
}

/// Makes `namespace/name` what `rendered` says, observed as `observed` (the watch cache;
/// `None` when the watch has not seen it, then it is read once: it may be missing or not
/// ours, and unowned objects carry no label the watch selects).
#[allow(clippy::too_many_arguments)]
pub async fn ensure<K>(
    api: &Api<K>,
    kind: &'static str,
    namespace: &str,
    name: &str,
    rendered: &K,
    observed: Option<K>,
    group_uid: &str,
    metrics: &Metrics,
) -> Result<Outcome<K>, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let observed = match observed {
        Some(o) => Some(o),
        None => api.get_opt(name).await.map_err(|source| Error::Get {
            kind,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })?,
    };
    let desired = apply::with_applied_hash(rendered).map_err(|source| Error::SerializeOwned {
        kind,
        name: name.to_owned(),
        source,
    })?;
    let observed_json = observed
        .as_ref()
        .map(serde_json::to_value)
        .transpose()
        .map_err(|source| Error::SerializeOwned {
            kind,
            name: name.to_owned(),
            source,
        })?;
    match (
        apply::decide(&desired, observed_json.as_ref(), group_uid),
        observed,
    ) {
        (Decision::NotOwned, _) => {
            info!(kind, namespace, name, "not owned by the group; left alone");
            Ok(Outcome::NotOwned)
        }
        (Decision::UpToDate, Some(o)) => {
            debug!(kind, name, "up to date; not applied");
            Ok(Outcome::UpToDate(o))
        }
        _ => {
            let applied = apply_json(api, name, &desired)
                .await
                .map_err(|source| Error::Apply {
                    kind,
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    source,
                })?;
            metrics.applies(kind);
            debug!(kind, name, "applied");
            Ok(Outcome::Applied(applied))
        }
    }
}

async fn apply_json<K>(api: &Api<K>, name: &str, desired: &Value) -> Result<K, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(name, &pp, &Patch::Apply(desired)).await
}

/// Makes the group's ConfigMap, then its Deployment, what the spec renders to. Returns
/// the Deployment as stored (`None` when it could not be made) and the problems the API
/// server's refusals are ([`crate::api_problem::classify`]); other failures are errors
/// (retried with backoff). An object of either name the group does not own stops here:
/// the Deployment is not made to mount a ConfigMap that is not ours.
pub async fn ensure_group_objects(
    kcg: &KinesisConsumerGroup,
    ctx: &Context,
    ns: &str,
) -> Result<(Option<Deployment>, Vec<Problem>), Error> {
    let group = kcg.group_id();
    let uid = kcg.uid().unwrap_or_default();
    let rendered = resources::render(kcg, &ctx.settings).map_err(|source| Error::Render {
        group: group.clone(),
        source,
    })?;
    let cm_name = resources::config_map_name(kcg);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), ns);
    let observed_cm = ctx.observed.config_map(ns, &cm_name).map(|c| (*c).clone());
    let cm = ensure(
        &config_maps,
        "ConfigMap",
        ns,
        &cm_name,
        &rendered.config_map,
        observed_cm,
        &uid,
        &ctx.metrics,
    )
    .await;
    match refusal(cm, &group) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Ok((
                None,
                vec![api_problem::not_owned("ConfigMap", ns, &cm_name, &group)],
            ));
        }
        Err(Refused::Problem(p)) => return Ok((None, vec![p])),
        Err(Refused::Error(e)) => return Err(*e),
    }
    let name = resources::deployment_name(kcg);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let observed = ctx.observed.deployment(ns, &name).map(|d| (*d).clone());
    let deployment = ensure(
        &deployments,
        "Deployment",
        ns,
        &name,
        &rendered.deployment,
        observed,
        &uid,
        &ctx.metrics,
    )
    .await;
    match refusal(deployment, &group) {
        Ok(Some(d)) => Ok((Some(d), Vec::new())),
        Ok(None) => Ok((
            None,
            vec![api_problem::not_owned("Deployment", ns, &name, &group)],
        )),
        Err(Refused::Problem(p)) => Ok((None, vec![p])),
        Err(Refused::Error(e)) => Err(*e),
    }
}

/// Makes the workers' PodDisruptionBudget what the spec wants: applied (only on a
/// difference, like the Deployment) while one is wanted, deleted once it is not (replicas
/// down to 1, suspended, disabled). Returns the problem an API refusal is.
pub async fn ensure_disruption_budget(
    kcg: &KinesisConsumerGroup,
    ctx: &Context,
    ns: &str,
) -> Result<Vec<Problem>, Error> {
    let group = kcg.group_id();
    let name = disruption::pdb_name(kcg);
    let api: Api<PodDisruptionBudget> = Api::namespaced(ctx.client.clone(), ns);
    let observed = ctx.observed.budget(ns, &name).map(|b| (*b).clone());
    let wanted = disruption::pod_disruption_budget(kcg);
    // With the watch, a budget to delete is one the cache holds; without it (tests, or
    // before the first list), only a spec change can have made one unwanted.
    let may_exist = if ctx.observed.watches_budgets() {
        observed.is_some()
    } else {
        kcg.status.as_ref().and_then(|s| s.observed_generation) != kcg.metadata.generation
            || kcg.metadata.generation.is_none()
    };
    match (disruption::pdb_action(wanted.is_some(), may_exist), wanted) {
        (PdbAction::Apply, Some(pdb)) => {
            let uid = kcg.uid().unwrap_or_default();
            let outcome = ensure(
                &api,
                "PodDisruptionBudget",
                ns,
                &name,
                &pdb,
                observed,
                &uid,
                &ctx.metrics,
            )
            .await;
            match refusal(outcome, &group) {
                Ok(Some(_)) => Ok(Vec::new()),
                Ok(None) => Ok(vec![api_problem::not_owned(
                    "PodDisruptionBudget",
                    ns,
                    &name,
                    &group,
                )]),
                Err(Refused::Problem(p)) => Ok(vec![p]),
                Err(Refused::Error(e)) => Err(*e),
            }
        }
        (PdbAction::Delete, _) => match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                debug!(pdb = %name, "deleted the PodDisruptionBudget the spec no longer wants");
                Ok(Vec::new())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(Vec::new()),
            Err(source) => Err(Error::Delete {
                kind: "PodDisruptionBudget",
                namespace: ns.to_owned(),
                name,
                source,
            }),
        },
        _ => Ok(Vec::new()),
    }
}

enum Refused {
    Problem(Problem),
    /// Boxed: the error is large and this is the rare path.
    Error(Box<Error>),
}

/// The object of an outcome (`None` when not owned), or what a failure is.
fn refusal<K>(outcome: Result<Outcome<K>, Error>, group: &str) -> Result<Option<K>, Refused> {
    match outcome {
        Ok(Outcome::Applied(o) | Outcome::UpToDate(o)) => Ok(Some(o)),
        Ok(Outcome::NotOwned) => Ok(None),
        Err(e) => {
            let (verb, kind, namespace, name, status) = match &e {
                Error::Apply {
                    kind,
                    namespace,
                    name,
                    source: kube::Error::Api(s),
                } => ("apply", *kind, namespace, name, s),
                Error::Get {
                    kind,
                    namespace,
                    name,
                    source: kube::Error::Api(s),
                } => ("get", *kind, namespace, name, s),
                _ => return Err(Refused::Error(Box::new(e))),
            };
            if api_problem::namespace_terminating(status) {
                return Err(Refused::Error(Box::new(Error::NamespaceTerminating {
                    namespace: namespace.clone(),
                })));
            }
            match api_problem::classify(verb, kind, namespace, name, status) {
                Some(p) => {
                    debug!(group, reason = %p.reason, "refused by the API server");
                    Err(Refused::Problem(p))
                }
                None => Err(Refused::Error(Box::new(e))),
            }
        }
    }
}
