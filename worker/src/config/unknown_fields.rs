//! Fields of a config that this worker version does not know: a typo (`startPositon`) in a
//! hand-written file or a `KCG__` override, or a field a newer operator rendered.
//!
//! Serde itself finds them ([`serde_ignored`] reports every key the derived `Deserialize`
//! skipped), so the check cannot drift from the types; the schema of [`WorkerConfig`] only
//! supplies the known names for a did-you-mean. The types keep accepting unknown fields (no
//! `deny_unknown_fields`), because the CRD embeds them and the operator's own reads must not
//! depend on it.

use figment::Figment;
use figment::value::Value;
use serde_json::Value as Json;

use super::{ENV_PREFIX, WorkerConfig, screaming_snake};

/// One step of a field path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// A field present in the config that no type declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownField {
    /// The field's path, e.g. `streams[0].startPositon`.
    pub path: String,
    /// Where it came from: the file (or document) name, or the `KCG__...` variable.
    pub source: String,
    /// Whether it came from a `KCG__` environment override.
    pub from_env: bool,
    /// The closest known field at the same place, when one is close.
    pub suggestion: Option<String>,
    /// The known fields at that place, for a message when nothing is close.
    pub known: Vec<String>,
}

impl std::fmt::Display for UnknownField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: unknown field", self.path)?;
        match &self.suggestion {
            Some(s) => write!(f, " (did you mean {s}?)")?,
            None if !self.known.is_empty() => {
                write!(f, " (known here: {})", self.known.join(", "))?
            }
            None => {}
        }
        write!(f, " (in {})", self.source)
    }
}

/// The unknown fields of the merged `figment` (file plus overrides), keys in sorted order.
/// `origin` names the file for fields that did not come from the environment.
pub(super) fn find(figment: &Figment, origin: &str) -> Vec<UnknownField> {
    let Ok(root) = figment.find_value("") else {
        // The regular extraction reports why the figment does not evaluate.
        return Vec::new();
    };
    let mut paths: Vec<Vec<Step>> = Vec::new();
    let _ = serde_ignored::deserialize::<_, _, WorkerConfig>(&root, |p| {
        let mut steps = Vec::new();
        steps_of(&p, &mut steps);
        paths.push(steps);
    });
    let schema = schema();
    paths
        .into_iter()
        .map(|steps| {
            let metadata = lookup(&root, &steps).and_then(|v| figment.get_metadata(v.tag()));
            let from_env = metadata.is_some_and(|m| m.name.contains("environment"));
            let source = if from_env {
                let var: Vec<_> = steps
                    .iter()
                    .filter_map(|s| match s {
                        Step::Key(k) => Some(screaming_snake(k)),
                        Step::Index(_) => None,
                    })
                    .collect();
                format!("{ENV_PREFIX}{}", var.join("__"))
            } else {
                origin.to_owned()
            };
            let (parent, last) = steps.split_at(steps.len().saturating_sub(1));
            let known = known_fields(&schema, parent);
            let suggestion = match last.first() {
                Some(Step::Key(k)) => closest(k, &known),
                _ => None,
            };
            UnknownField {
                path: render(&steps),
                source,
                from_env,
                suggestion,
                known,
            }
        })
        .collect()
}

/// Flattens serde_ignored's linked path (root first); `Some`/newtype wrappers add no step.
fn steps_of(path: &serde_ignored::Path<'_>, out: &mut Vec<Step>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            steps_of(parent, out);
            out.push(Step::Index(*index));
        }
        Path::Map { parent, key } => {
            steps_of(parent, out);
            out.push(Step::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => steps_of(parent, out),
    }
}

/// `streams[0].startPositon`, the way the other config messages name fields.
fn render(steps: &[Step]) -> String {
    let mut out = String::new();
    for s in steps {
        match s {
            Step::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Step::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The value at `steps`, to read its tag (which provider set it).
fn lookup<'a>(root: &'a Value, steps: &[Step]) -> Option<&'a Value> {
    steps.iter().try_fold(root, |v, s| match (v, s) {
        (Value::Dict(_, d), Step::Key(k)) => d.get(k),
        (Value::Array(_, a), Step::Index(i)) => a.get(*i),
        _ => None,
    })
}

/// The JSON schema of [`WorkerConfig`] with every subschema inlined, so a path can be
/// followed without resolving references.
fn schema() -> Json {
    let schema = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| s.inline_subschemas = true)
        .into_generator()
        .into_root_schema_for::<WorkerConfig>();
    schema.to_value()
}

/// The property names the schema declares at `steps`; empty when the path leaves the schema.
fn known_fields(schema: &Json, steps: &[Step]) -> Vec<String> {
    let mut here = vec![schema];
    for step in steps {
        here = here
            .into_iter()
            .flat_map(alternatives)
            .filter_map(|s| match step {
                Step::Key(k) => s.get("properties").and_then(|p| p.get(k)),
                Step::Index(_) => s.get("items"),
            })
            .collect();
    }
    let mut names: Vec<String> = here
        .into_iter()
        .flat_map(alternatives)
        .filter_map(|s| s.get("properties").and_then(Json::as_object))
        .flat_map(|p| p.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// A schema and the branches of its `anyOf`/`oneOf`/`allOf` (an `Option<T>` is `anyOf [T,
/// null]`).
fn alternatives(schema: &Json) -> Vec<&Json> {
    let mut out = vec![schema];
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(Json::Array(branches)) = schema.get(key) {
            out.extend(branches.iter().flat_map(alternatives));
        }
    }
    out
}

/// The known name closest to `typed`, if close enough to be the likely intent: compared
/// case-insensitively and ignoring `_`/`-`, so `poll_interval` and `PollInterval` find
/// `pollInterval` as well as `pollIntervall` does.
pub(super) fn closest(typed: &str, known: &[String]) -> Option<String> {
    fn norm(s: &str) -> String {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect()
    }
    let typed = norm(typed);
    known
        .iter()
        .map(|k| (strsim::normalized_damerau_levenshtein(&typed, &norm(k)), k))
        .filter(|(score, _)| *score >= 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::providers::{Format, Yaml};

    fn unknown(yaml: &str) -> Vec<String> {
        find(&Figment::from(Yaml::string(yaml)), "f.yaml")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    const BASE: &str =
        "group: ns/g\nstreams: [{name: s}]\nstateStore: {table: tbl}\ndelivery: {stdout: {}}\n";

    #[test]
    fn each_unknown_field_is_named_with_its_path_and_a_suggestion() {
        let cases: Vec<(String, Vec<&str>)> = vec![
            (BASE.to_owned(), vec![]),
            (
                BASE.replace("{name: s}", "{name: s, startPositon: Latest}"),
                vec![
                    "streams[0].startPositon: unknown field (did you mean startPosition?) (in f.yaml)",
                ],
            ),
            (
                format!("{BASE}tuning: {{pollIntervall: 5s}}\n"),
                vec![
                    "tuning.pollIntervall: unknown field (did you mean pollInterval?) (in f.yaml)",
                ],
            ),
            (
                format!("{BASE}tuning: {{poll_interval: 5s}}\n"),
                vec![
                    "tuning.poll_interval: unknown field (did you mean pollInterval?) (in f.yaml)",
                ],
            ),
            (
                format!("{BASE}stateStroe: {{table: x12}}\n"),
                vec!["stateStroe: unknown field (did you mean stateStore?) (in f.yaml)"],
            ),
            (
                BASE.replace("{stdout: {}}", "{stdout: {pretty: true}}"),
                // The stdout sink has no fields at all.
                vec!["delivery.stdout.pretty: unknown field (in f.yaml)"],
            ),
            (
                BASE.replace("{stdout: {}}", "{http: {url: \"http://x\", tiemout: 5s}}"),
                vec!["delivery.http.tiemout: unknown field (did you mean timeout?) (in f.yaml)"],
            ),
            (
                BASE.replace("{table: tbl}", "{table: tbl, colour: blue}"),
                vec![
                    "stateStore.colour: unknown field (known here: create, region, table) (in f.yaml)",
                ],
            ),
            (
                BASE.replace("[{name: s}]", "[{name: s}, {name: t, rgion: us-east-1}]")
                    + "extra: 1\n",
                vec![
                    "extra: unknown field (known here: delivery, group, stateStore, streams, tuning) (in f.yaml)",
                    "streams[1].rgion: unknown field (did you mean region?) (in f.yaml)",
                ],
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(unknown(&yaml), want, "{yaml}");
        }
    }

    #[test]
    fn closest_needs_a_near_name() {
        let known: Vec<String> = ["pollInterval", "maxRecordsPerCall", "minCallInterval"]
            .map(String::from)
            .to_vec();
        for (typed, want) in [
            ("pollIntervall", Some("pollInterval")),
            ("PollInterval", Some("pollInterval")),
            ("max_records_per_call", Some("maxRecordsPerCall")),
            ("minCallIntervl", Some("minCallInterval")),
            ("colour", None),
            ("interval", None),
        ] {
            assert_eq!(closest(typed, &known).as_deref(), want, "{typed}");
        }
    }
}
