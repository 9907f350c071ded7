//! Which streams each live client reads. A client row carries a digest of its stream list,
//! not the list (every worker reads every client row at every tick); a client whose digest
//! equals ours reads our list. Another list (a rollout that changed the streams) is read
//! once from its `clientstreams#` row and kept by client id and digest.

use super::*;
use crate::store::schema::ClientRow;

/// Stream lists of other clients, by client id: `(digest, list)`.
pub(super) type KnownLists = BTreeMap<String, (String, Vec<String>)>;

/// The streams `row`'s client reads, given our own list `names` (digest `mine`) and the
/// lists read so far. `None`: unknown, which the planner takes as every stream (as for
/// workers older than stream lists).
pub(super) fn stream_list<'a>(
    row: &'a ClientRow,
    mine: &str,
    names: &'a [String],
    known: &'a KnownLists,
) -> Option<&'a [String]> {
    if let Some(list) = row.streams.as_deref() {
        return Some(list); // an older worker's row, with the list itself
    }
    let digest = row.streams_digest.as_deref()?;
    if digest == mine {
        return Some(names);
    }
    known
        .get(&row.client_id)
        .filter(|(d, _)| d == digest)
        .map(|(_, list)| list.as_slice())
}

/// The clients of `rows` whose list we must read: a digest other than ours that we have not
/// read under that digest.
pub(super) fn unknown_lists(rows: &[ClientRow], mine: &str, known: &KnownLists) -> Vec<String> {
    rows.iter()
        .filter(|r| r.streams.is_none())
        .filter(|r| {
            r.streams_digest.as_deref().is_some_and(|d| {
                d != mine
                    && known
                        .get(&r.client_id)
                        .is_none_or(|(seen, _)| seen.as_str() != d)
            })
        })
        .map(|r| r.client_id.clone())
        .collect()
}

impl Engine {
    /// Reads the stream lists of `clients` we do not know yet (concurrently, bounded) and
    /// forgets those of clients gone. A list that cannot be read stays unknown until a
    /// later tick reads it.
    pub(super) async fn learn_client_streams(&mut self, clients: &[ClientRow], mine: &str) {
        self.client_lists
            .retain(|id, _| clients.iter().any(|c| &c.client_id == id));
        let wanted = unknown_lists(clients, mine, &self.client_lists);
        if wanted.is_empty() {
            return;
        }
        let group = self.group().to_owned();
        let reads = wanted
            .iter()
            .map(|id| {
                self.io(
                    "load_client_streams",
                    self.store.load_client_streams(&group, id),
                )
            })
            .collect();
        for res in bounded(reads).await {
            match res {
                Ok(Some(row)) => {
                    self.client_lists
                        .insert(row.client_id, (row.streams_digest, row.streams));
                }
                Ok(None) => {}
                Err(e) => debug!(error = %e, "stream list of a client not read"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, streams: Option<&[&str]>, digest: Option<&str>) -> ClientRow {
        ClientRow {
            streams: streams.map(|l| l.iter().map(|s| s.to_string()).collect()),
            streams_digest: digest.map(str::to_owned),
            ..ClientRow::for_test(id, 1)
        }
    }

    #[test]
    fn stream_lists_table() {
        let names = vec!["a".to_owned(), "b".to_owned()];
        let mut known = KnownLists::new();
        known.insert("c-3".into(), ("d2".into(), vec!["b".into(), "c".into()]));
        let rows = [
            row("c-1", Some(&["x"]), None),
            row("c-2", None, Some("mine")),
            row("c-3", None, Some("d2")),
            row("c-4", None, Some("d3")),
            row("c-5", None, None),
            // Known under an older digest: its list changed (a new incarnation).
            row("c-6", None, Some("d4")),
        ];
        known.insert("c-6".into(), ("d1".into(), vec!["a".into()]));
        let cases: [(&str, Option<Vec<&str>>); 6] = [
            ("an older worker's own list", Some(vec!["x"])),
            ("our digest: our list", Some(vec!["a", "b"])),
            ("read before under this digest", Some(vec!["b", "c"])),
            ("another digest, not read yet", None),
            ("an older worker without a list", None),
            ("read under another digest", None),
        ];
        for (r, (name, want)) in rows.iter().zip(cases) {
            let got = stream_list(r, "mine", &names, &known)
                .map(|l| l.iter().map(String::as_str).collect::<Vec<_>>());
            assert_eq!(got, want, "{name}");
        }
        assert_eq!(unknown_lists(&rows, "mine", &known), vec!["c-4", "c-6"]);
    }

    #[test]
    fn the_digest_follows_the_list_and_its_order() {
        use crate::store::schema::streams_digest;
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ab = streams_digest(&l(&["a", "b"]));
        assert_eq!(ab.len(), 16);
        assert_eq!(ab, streams_digest(&l(&["a", "b"])));
        assert_ne!(ab, streams_digest(&l(&["b", "a"])));
        assert_ne!(ab, streams_digest(&l(&["ab"])));
        assert_ne!(ab, streams_digest(&l(&["a", "b", "c"])));
    }
}
