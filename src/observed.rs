//! The owned objects as the controller's watches last saw them: reflector caches of the
//! ConfigMaps, Deployments and PodDisruptionBudgets labelled `app.kubernetes.io/managed-by: kcg-operator`, one per
//! watched namespace scope. Reconciles compare against these instead of reading or
//! applying, so a group whose objects are as rendered costs the API server nothing.

use std::sync::Arc;

use futures::{Stream, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

/// Label selector of the objects the operator makes.
pub const OWNED_SELECTOR: &str = "app.kubernetes.io/managed-by=kcg-operator";

/// Caches of the owned objects, searched in every scope.
#[derive(Clone, Default)]
pub struct Observed {
    config_maps: Vec<Store<ConfigMap>>,
    deployments: Vec<Store<Deployment>>,
    budgets: Vec<Store<PodDisruptionBudget>>,
}

impl Observed {
    /// Caches that are filled elsewhere (tests feed them through their writers).
    pub fn new(
        config_maps: Vec<Store<ConfigMap>>,
        deployments: Vec<Store<Deployment>>,
        budgets: Vec<Store<PodDisruptionBudget>>,
    ) -> Self {
        Self {
            config_maps,
            deployments,
            budgets,
        }
    }

    /// The ConfigMap `namespace/name`, if the watch has seen it.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<Arc<ConfigMap>> {
        find(&self.config_maps, namespace, name)
    }

    /// The Deployment `namespace/name`, if the watch has seen it.
    pub fn deployment(&self, namespace: &str, name: &str) -> Option<Arc<Deployment>> {
        find(&self.deployments, namespace, name)
    }

    /// The PodDisruptionBudget `namespace/name`, if the watch has seen it.
    pub fn budget(&self, namespace: &str, name: &str) -> Option<Arc<PodDisruptionBudget>> {
        find(&self.budgets, namespace, name)
    }

    /// Whether PodDisruptionBudgets are watched (else a missing cache entry says nothing).
    pub fn watches_budgets(&self) -> bool {
        !self.budgets.is_empty()
    }

    /// Adds the caches of one more scope.
    pub fn add(
        &mut self,
        config_maps: Store<ConfigMap>,
        deployments: Store<Deployment>,
        budgets: Store<PodDisruptionBudget>,
    ) {
        self.config_maps.push(config_maps);
        self.deployments.push(deployments);
        self.budgets.push(budgets);
    }
}

fn find<K>(stores: &[Store<K>], namespace: &str, name: &str) -> Option<Arc<K>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let key = ObjectRef::new(name).within(namespace);
    stores.iter().find_map(|s| s.get(&key))
}

/// A watch of the owned objects of `api` that keeps `store` current (managed fields
/// dropped: they are the bulk of an object and never read) and yields every touched object,
/// for `Controller::owns_stream`. The cache is written before the object is yielded, so the
/// reconcile it triggers sees it.
pub fn owned_stream<K>(
    api: Api<K>,
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send,
)
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(OWNED_SELECTOR);
    let stream = reflector::reflector(
        writer,
        watcher(api, config).map_ok(|ev| {
            ev.modify(|o| {
                o.managed_fields_mut().clear();
            })
        }),
    )
    .touched_objects();
    (store, stream)
}
