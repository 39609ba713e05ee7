//! Field policies and conflict resolution: which of a field's concurrent values a reader sees.
//!
//! [`resolve`] is a pure function of the *set* of concurrent candidates: the same set, given in
//! any order and with any duplicates, resolves to the same value on every replica, so replicas
//! that hold the same concurrent values agree without talking to each other. It reads no clock
//! and no state; time and identities are in the candidates. It does not write anything either:
//! the document keeps every concurrent value, and resolution happens at read time (see
//! `docs/policies.md`). Not here: which fields have which policy (`collection`), validation
//! (`schema`), and recording conflicts (`ledger`).
//!
//! | policy     | winner among the concurrent values                                            |
//! |------------|-------------------------------------------------------------------------------|
//! | `lww`      | the highest operation id: automerge's own deterministic winner (the default)  |
//! | `latest`   | the highest hybrid-logical-clock timestamp, then the highest operation id      |
//! | `priority` | the origin ranked first in the list; unlisted origins rank below all listed    |
//! | `max`      | the greatest number; any number beats any non-number                           |
//! | `min`      | the smallest number; any number beats any non-number                           |
//! | `counter`  | as `lww`: automerge counters already add concurrent increments up              |
//! | `union`    | the union of all array candidates, deduplicated and sorted by canonical JSON   |
//! | `ordered`  | the highest rank in the lattice; values outside the lattice rank lowest         |
//!
//! Every remaining tie is broken by the highest operation id and then by the rest of the
//! candidate (timestamp, origin, canonical value), so even malformed input (two candidates with
//! the same operation id) resolves deterministically.
//!
//! ```
//! use crdt::clock::Timestamp;
//! use crdt::policy::{Candidate, OperationId, Policy, resolve};
//! use serde_json::json;
//!
//! let order = vec![json!("draft"), json!("approved"), json!("shipped")];
//! let policy = Policy::ordered(order).expect("a valid lattice");
//! let candidates = [
//!     Candidate::new(json!("shipped"), "store-1", Timestamp { wall_ms: 10, logical: 0 }, OperationId::from_lamport(3, &[1; 16])),
//!     Candidate::new(json!("approved"), "hq", Timestamp { wall_ms: 20, logical: 0 }, OperationId::from_lamport(4, &[2; 16])),
//! ];
//! let resolution = resolve(&policy, &candidates).expect("candidates were given");
//! assert_eq!(resolution.value, json!("shipped"));
//! assert_eq!(resolution.losers.len(), 1);
//! ```

use std::cmp::Ordering;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Number, Value};

use crate::canonical::{canonical, compare_numbers};
use crate::clock::Timestamp;

/// The most node names in a `priority` list and the most members of an `ordered` lattice.
pub const LIST_MEMBERS_MAX: usize = 256;
/// The longest node name in a `priority` list, in bytes.
pub const NODE_NAME_BYTES_MAX: usize = 256;
/// The longest lattice member of an `ordered` policy, in bytes of canonical JSON.
pub const MEMBER_BYTES_MAX: usize = 1024;

/// How a field's concurrent values resolve. Parameters (the priority list, the lattice) are
/// checked when the policy is built, so every `Policy` value is well formed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Policy {
    /// The highest operation id wins: what automerge shows on its own.
    #[default]
    Lww,
    /// The highest hybrid-logical-clock timestamp wins.
    Latest,
    /// Node names, highest rank first. Built by [`Policy::priority`].
    Priority(Vec<String>),
    /// The greatest number wins.
    Max,
    /// The smallest number wins.
    Min,
    /// The value automerge merged: concurrent increments of a counter already add up.
    Counter,
    /// Arrays merge as sets.
    Union,
    /// Lattice members, lowest first. Built by [`Policy::ordered`].
    Ordered(Vec<Value>),
}

/// Why a policy could not be built. Nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown policy {0:?}; the policies are lww, latest, priority, max, min, counter, union and ordered")]
    Unknown(String),
    #[error("policy {policy} needs {parameter:?}")]
    Missing { policy: &'static str, parameter: &'static str },
    #[error("{parameter:?} does not apply to policy {policy}")]
    Unexpected { policy: &'static str, parameter: &'static str },
    #[error("{parameter:?} is empty")]
    Empty { parameter: &'static str },
    #[error("{parameter:?} has {count} members; the limit is {LIST_MEMBERS_MAX}")]
    TooManyMembers { parameter: &'static str, count: usize },
    #[error("{parameter:?} names {member} twice")]
    Duplicate { parameter: &'static str, member: String },
    #[error("{parameter:?} member {member} is not allowed: {reason}")]
    Member { parameter: &'static str, member: String, reason: &'static str },
}

impl Policy {
    /// A `priority` policy: `nodes` ranked highest first. Refuses an empty list, duplicates, more
    /// than [`LIST_MEMBERS_MAX`] names, and empty names or names over [`NODE_NAME_BYTES_MAX`].
    pub fn priority(nodes: Vec<String>) -> Result<Policy, PolicyError> {
        const PARAMETER: &str = "priority";
        check_count(PARAMETER, nodes.len())?;
        for (index, node) in nodes.iter().enumerate() {
            let member = || format!("{node:?}");
            if node.is_empty() || node.len() > NODE_NAME_BYTES_MAX {
                let reason = "a node name is 1 to 256 bytes";
                return Err(PolicyError::Member { parameter: PARAMETER, member: member(), reason });
            }
            if nodes[..index].contains(node) {
                return Err(PolicyError::Duplicate { parameter: PARAMETER, member: member() });
            }
        }
        Ok(Policy::Priority(nodes))
    }

    /// An `ordered` policy: the lattice `members`, lowest first. Members are strings, numbers or
    /// booleans, compared by exact JSON equality (`2` and `2.0` are different members). Refuses
    /// an empty lattice, duplicates, other kinds of members, members over [`MEMBER_BYTES_MAX`]
    /// and more than [`LIST_MEMBERS_MAX`] members.
    pub fn ordered(members: Vec<Value>) -> Result<Policy, PolicyError> {
        const PARAMETER: &str = "order";
        check_count(PARAMETER, members.len())?;
        let mut seen = Vec::with_capacity(members.len());
        for member in &members {
            let text = canonical(member);
            if !matches!(member, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                let reason = "lattice members are strings, numbers or booleans";
                return Err(PolicyError::Member { parameter: PARAMETER, member: text, reason });
            }
            if text.len() > MEMBER_BYTES_MAX {
                let reason = "a lattice member is at most 1024 bytes of JSON";
                return Err(PolicyError::Member { parameter: PARAMETER, member: text, reason });
            }
            if seen.contains(&text) {
                return Err(PolicyError::Duplicate { parameter: PARAMETER, member: text });
            }
            seen.push(text);
        }
        Ok(Policy::Ordered(members))
    }

    /// Builds a policy from its name and parameters, as a definition spells them.
    pub fn from_parts(
        name: &str,
        priority: Option<Vec<String>>,
        order: Option<Vec<Value>>,
    ) -> Result<Policy, PolicyError> {
        let policy = match name {
            "lww" => Policy::Lww,
            "latest" => Policy::Latest,
            "max" => Policy::Max,
            "min" => Policy::Min,
            "counter" => Policy::Counter,
            "union" => Policy::Union,
            "priority" => {
                if order.is_some() {
                    return Err(PolicyError::Unexpected { policy: "priority", parameter: "order" });
                }
                let nodes = priority.ok_or(PolicyError::Missing { policy: "priority", parameter: "priority" })?;
                return Policy::priority(nodes);
            }
            "ordered" => {
                if priority.is_some() {
                    return Err(PolicyError::Unexpected { policy: "ordered", parameter: "priority" });
                }
                let members = order.ok_or(PolicyError::Missing { policy: "ordered", parameter: "order" })?;
                return Policy::ordered(members);
            }
            other => return Err(PolicyError::Unknown(other.to_owned())),
        };
        let unexpected = |parameter| PolicyError::Unexpected { policy: policy.name(), parameter };
        if priority.is_some() {
            return Err(unexpected("priority"));
        }
        if order.is_some() {
            return Err(unexpected("order"));
        }
        Ok(policy)
    }

    /// The policy's name, as definitions spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Lww => "lww",
            Policy::Latest => "latest",
            Policy::Priority(_) => "priority",
            Policy::Max => "max",
            Policy::Min => "min",
            Policy::Counter => "counter",
            Policy::Union => "union",
            Policy::Ordered(_) => "ordered",
        }
    }

    /// The rank of `value` in an `ordered` lattice, from 1 for the lowest member; 0 for a value
    /// outside the lattice, or when the policy is not `ordered`.
    pub fn lattice_rank(&self, value: &Value) -> usize {
        let Policy::Ordered(members) = self else { return 0 };
        members.iter().position(|member| member == value).map_or(0, |index| index + 1)
    }
}

fn check_count(parameter: &'static str, count: usize) -> Result<(), PolicyError> {
    if count == 0 {
        return Err(PolicyError::Empty { parameter });
    }
    if count > LIST_MEMBERS_MAX {
        return Err(PolicyError::TooManyMembers { parameter, count });
    }
    Ok(())
}

impl fmt::Display for Policy {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// A policy as definitions and the wire spell it: `{"policy": "ordered", "order": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyText {
    pub(crate) policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) priority: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) order: Option<Vec<Value>>,
}

impl From<&Policy> for PolicyText {
    fn from(policy: &Policy) -> PolicyText {
        let (priority, order) = match policy {
            Policy::Priority(nodes) => (Some(nodes.clone()), None),
            Policy::Ordered(members) => (None, Some(members.clone())),
            _ => (None, None),
        };
        PolicyText { policy: policy.name().to_owned(), priority, order }
    }
}

impl Serialize for Policy {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        PolicyText::from(self).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Policy, D::Error> {
        let text = PolicyText::deserialize(deserializer)?;
        Policy::from_parts(&text.policy, text.priority, text.order).map_err(serde::de::Error::custom)
    }
}

/// Stands for automerge's own order of concurrent operations: compared as bytes, the greatest
/// is the value automerge shows. Built with [`OperationId::from_lamport`], whose bytes sort as
/// automerge sorts operations (counter, then actor). Opaque otherwise.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OperationId(pub Vec<u8>);

impl OperationId {
    /// The id of the automerge operation with Lamport counter `counter` made by `actor`: the
    /// counter in big-endian, then the actor bytes, so byte order is automerge's order.
    pub fn from_lamport(counter: u64, actor: &[u8]) -> OperationId {
        let mut bytes = Vec::with_capacity(8 + actor.len());
        bytes.extend_from_slice(&counter.to_be_bytes());
        bytes.extend_from_slice(actor);
        OperationId(bytes)
    }
}

impl fmt::Debug for OperationId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "OperationId({})", hex::encode(&self.0))
    }
}

impl fmt::Display for OperationId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&hex::encode(&self.0))
    }
}

/// Hex in JSON and other human-readable formats, raw bytes in binary ones (MessagePack).
impl Serialize for OperationId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&hex::encode(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for OperationId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<OperationId, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            hex::decode(text).map(OperationId).map_err(serde::de::Error::custom)
        } else {
            serde_bytes::ByteBuf::deserialize(deserializer).map(|bytes| OperationId(bytes.into_vec()))
        }
    }
}

/// One concurrent value of a field, with what resolution may look at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// The value this write gave the field.
    pub value: Value,
    /// The name of the node that made the write (what `priority` lists name).
    pub origin: String,
    /// When the write was made, on its origin's hybrid logical clock.
    pub timestamp: Timestamp,
    /// The write's place in automerge's order of operations.
    pub operation: OperationId,
}

impl Candidate {
    pub fn new(value: Value, origin: &str, timestamp: Timestamp, operation: OperationId) -> Candidate {
        Candidate { value, origin: origin.to_owned(), timestamp, operation }
    }
}

/// What a set of concurrent candidates resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The value readers see.
    pub value: Value,
    /// The candidate whose value is shown; `None` when the value was merged from several
    /// (`union` with at least one array candidate).
    pub winner: Option<Candidate>,
    /// Distinct candidates whose value is not shown (for a `union`, the non-arrays that were
    /// left out), in the deterministic order of [`normalize`]. Empty when nothing lost.
    pub losers: Vec<Candidate>,
}

/// The candidates as a set: duplicates removed, in one deterministic order (operation id, then
/// timestamp, origin and canonical value), whatever order they were given in.
pub fn normalize(candidates: &[Candidate]) -> Vec<Candidate> {
    entries(candidates).into_iter().map(|entry| entry.candidate.clone()).collect()
}

/// Resolves the concurrent `candidates` of one field under `policy`; `None` when there are no
/// candidates. Identical for every order and duplication of the same set.
pub fn resolve(policy: &Policy, candidates: &[Candidate]) -> Option<Resolution> {
    let entries = entries(candidates);
    if entries.is_empty() {
        return None;
    }
    if matches!(policy, Policy::Union) && entries.iter().any(|entry| entry.candidate.value.is_array()) {
        return Some(union(&entries));
    }
    let winner = entries
        .iter()
        .enumerate()
        .max_by(|(_, left), (_, right)| rank(policy, left, right).then_with(|| left.full_order(right)));
    let (index, winner) = winner?;
    let losers =
        entries.iter().enumerate().filter(|(other, _)| *other != index).map(|(_, entry)| entry.candidate.clone());
    Some(Resolution {
        value: winner.candidate.value.clone(),
        winner: Some(winner.candidate.clone()),
        losers: losers.collect(),
    })
}

/// A candidate with its canonical value text, computed once.
struct Entry<'a> {
    candidate: &'a Candidate,
    canonical: String,
}

impl Entry<'_> {
    /// The total order every tie falls back to: operation id, timestamp, origin, value.
    fn full_order(&self, other: &Entry<'_>) -> Ordering {
        let (left, right) = (self.candidate, other.candidate);
        left.operation
            .cmp(&right.operation)
            .then_with(|| left.timestamp.cmp(&right.timestamp))
            .then_with(|| left.origin.cmp(&right.origin))
            .then_with(|| self.canonical.cmp(&other.canonical))
    }
}

/// The distinct candidates in their full order.
fn entries(candidates: &[Candidate]) -> Vec<Entry<'_>> {
    let mut entries: Vec<Entry<'_>> =
        candidates.iter().map(|candidate| Entry { candidate, canonical: canonical(&candidate.value) }).collect();
    entries.sort_by(|left, right| left.full_order(right));
    entries.dedup_by(|left, right| left.full_order(right) == Ordering::Equal);
    entries
}

/// How `policy` ranks two candidates before the tie-break; `Greater` means `left` wins.
fn rank(policy: &Policy, left: &Entry<'_>, right: &Entry<'_>) -> Ordering {
    let (left, right) = (left.candidate, right.candidate);
    match policy {
        Policy::Lww | Policy::Counter | Policy::Union => Ordering::Equal,
        Policy::Latest => left.timestamp.cmp(&right.timestamp),
        Policy::Priority(nodes) => {
            let standing =
                |origin: &str| nodes.iter().position(|node| node == origin).map_or(0, |index| nodes.len() - index);
            standing(&left.origin).cmp(&standing(&right.origin))
        }
        Policy::Max => by_number(&left.value, &right.value, compare_numbers),
        Policy::Min => by_number(&left.value, &right.value, |left, right| compare_numbers(right, left)),
        Policy::Ordered(_) => policy.lattice_rank(&left.value).cmp(&policy.lattice_rank(&right.value)),
    }
}

/// Numbers rank above non-numbers; two numbers rank by `better`.
fn by_number(left: &Value, right: &Value, better: impl Fn(&Number, &Number) -> Ordering) -> Ordering {
    match (left, right) {
        (Value::Number(left), Value::Number(right)) => better(left, right),
        (Value::Number(_), _) => Ordering::Greater,
        (_, Value::Number(_)) => Ordering::Less,
        _ => Ordering::Equal,
    }
}

/// The union of the array candidates' elements, deduplicated and sorted by canonical text.
/// Non-array candidates are left out and lose.
fn union(entries: &[Entry<'_>]) -> Resolution {
    let mut elements: Vec<(String, &Value)> = entries
        .iter()
        .filter_map(|entry| entry.candidate.value.as_array())
        .flatten()
        .map(|element| (canonical(element), element))
        .collect();
    elements.sort_by(|left, right| left.0.cmp(&right.0));
    elements.dedup_by(|left, right| left.0 == right.0);
    let value = Value::Array(elements.into_iter().map(|(_, element)| element.clone()).collect());
    let losers =
        entries.iter().filter(|entry| !entry.candidate.value.is_array()).map(|entry| entry.candidate.clone()).collect();
    Resolution { value, winner: None, losers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn candidate(value: Value, origin: &str, wall_ms: u64, counter: u64) -> Candidate {
        Candidate::new(
            value,
            origin,
            Timestamp { wall_ms, logical: 0 },
            OperationId::from_lamport(counter, &[counter as u8; 16]),
        )
    }

    fn resolved(policy: &Policy, candidates: &[Candidate]) -> Value {
        resolve(policy, candidates).map(|resolution| resolution.value).unwrap_or(Value::Null)
    }

    #[test]
    fn nothing_to_resolve_is_none() {
        assert_eq!(resolve(&Policy::Lww, &[]), None);
    }

    #[test]
    fn lww_picks_the_highest_operation_id() {
        let candidates = [candidate(json!("a"), "x", 99, 1), candidate(json!("b"), "y", 1, 2)];
        let resolution = resolve(&Policy::Lww, &candidates).expect("candidates");
        assert_eq!(resolution.value, json!("b"));
        assert_eq!(resolution.winner, Some(candidates[1].clone()));
        assert_eq!(resolution.losers, vec![candidates[0].clone()]);
        assert_eq!(resolved(&Policy::Counter, &candidates), json!("b"));
    }

    #[test]
    fn latest_picks_the_highest_timestamp_then_the_operation_id() {
        let candidates = [candidate(json!("a"), "x", 99, 1), candidate(json!("b"), "y", 1, 2)];
        assert_eq!(resolved(&Policy::Latest, &candidates), json!("a"));
        let tied = [candidate(json!("a"), "x", 5, 1), candidate(json!("b"), "y", 5, 2)];
        assert_eq!(resolved(&Policy::Latest, &tied), json!("b"));
        let logical = [
            Candidate::new(json!("a"), "x", Timestamp { wall_ms: 5, logical: 2 }, OperationId::from_lamport(1, &[1])),
            Candidate::new(json!("b"), "y", Timestamp { wall_ms: 5, logical: 1 }, OperationId::from_lamport(2, &[2])),
        ];
        assert_eq!(resolved(&Policy::Latest, &logical), json!("a"));
    }

    #[test]
    fn priority_ranks_listed_origins_first_and_unlisted_below() {
        let policy = Policy::priority(vec!["hq".into(), "store-1".into()]).expect("valid");
        let candidates = [
            candidate(json!("store"), "store-1", 1, 3),
            candidate(json!("hq"), "hq", 1, 1),
            candidate(json!("other"), "store-9", 1, 9),
        ];
        assert_eq!(resolved(&policy, &candidates), json!("hq"));
        assert_eq!(resolved(&policy, &candidates[..1]), json!("store"));
        assert_eq!(resolved(&policy, &[candidates[0].clone(), candidates[2].clone()]), json!("store"));
        let unlisted = [candidate(json!(1), "a", 1, 1), candidate(json!(2), "b", 1, 2)];
        assert_eq!(resolved(&policy, &unlisted), json!(2));
        let same_origin = [candidate(json!(1), "hq", 1, 2), candidate(json!(2), "hq", 1, 1)];
        assert_eq!(resolved(&policy, &same_origin), json!(1));
    }

    #[test]
    fn max_and_min_prefer_numbers_and_compare_exactly() {
        let candidates = [
            candidate(json!("text"), "a", 1, 9),
            candidate(json!(2.5), "b", 1, 1),
            candidate(json!(u64::MAX), "c", 1, 2),
            candidate(json!(-3), "d", 1, 3),
            candidate(json!(null), "e", 1, 8),
        ];
        assert_eq!(resolved(&Policy::Max, &candidates), json!(u64::MAX));
        assert_eq!(resolved(&Policy::Min, &candidates), json!(-3));
        let no_numbers = [candidate(json!("a"), "a", 1, 1), candidate(json!(null), "b", 1, 2)];
        assert_eq!(resolved(&Policy::Max, &no_numbers), json!(null));
        assert_eq!(resolved(&Policy::Min, &no_numbers), json!(null));
        let equal = [candidate(json!(1.0), "a", 1, 1), candidate(json!(1), "b", 1, 2)];
        assert_eq!(resolved(&Policy::Max, &equal), json!(1));
    }

    #[test]
    fn union_merges_arrays_as_sorted_sets_and_drops_non_arrays() {
        let candidates = [
            candidate(json!(["b", "a", "b"]), "x", 1, 1),
            candidate(json!(["c", "a", {"k": 1}]), "y", 1, 2),
            candidate(json!("scalar"), "z", 1, 3),
        ];
        let resolution = resolve(&Policy::Union, &candidates).expect("candidates");
        assert_eq!(resolution.value, json!(["a", "b", "c", {"k": 1}]));
        assert_eq!(resolution.winner, None);
        assert_eq!(resolution.losers, vec![candidates[2].clone()]);
        let scalars = [candidate(json!(1), "x", 1, 1), candidate(json!(2), "y", 1, 2)];
        assert_eq!(resolved(&Policy::Union, &scalars), json!(2));
    }

    #[test]
    fn ordered_picks_the_highest_rank_and_ranks_strangers_lowest() {
        let policy = Policy::ordered(vec![json!("draft"), json!("approved"), json!("shipped")]).expect("valid");
        let candidates = [
            candidate(json!("approved"), "a", 1, 1),
            candidate(json!("draft"), "b", 1, 2),
            candidate(json!("unknown"), "c", 1, 3),
        ];
        assert_eq!(resolved(&policy, &candidates), json!("approved"));
        let strangers = [candidate(json!("x"), "a", 1, 1), candidate(json!("y"), "b", 1, 2)];
        assert_eq!(resolved(&policy, &strangers), json!("y"));
        assert_eq!(policy.lattice_rank(&json!("shipped")), 3);
        assert_eq!(policy.lattice_rank(&json!("nope")), 0);
    }

    #[test]
    fn duplicates_and_order_do_not_matter_even_with_colliding_operation_ids() {
        let operation = OperationId::from_lamport(1, &[1]);
        let first = Candidate::new(json!("a"), "x", Timestamp::default(), operation.clone());
        let second = Candidate::new(json!("b"), "x", Timestamp::default(), operation);
        let forward = resolve(&Policy::Lww, &[first.clone(), second.clone(), first.clone()]);
        let backward = resolve(&Policy::Lww, &[second.clone(), first.clone(), second]);
        assert_eq!(forward, backward);
        assert_eq!(forward.map(|resolution| resolution.losers.len()), Some(1));
    }

    #[test]
    fn policies_are_built_from_parts_with_clear_errors() {
        assert_eq!(Policy::from_parts("lww", None, None), Ok(Policy::Lww));
        assert_eq!(Policy::from_parts("newest", None, None), Err(PolicyError::Unknown("newest".into())));
        assert_eq!(
            Policy::from_parts("priority", None, None),
            Err(PolicyError::Missing { policy: "priority", parameter: "priority" })
        );
        assert_eq!(
            Policy::from_parts("priority", Some(vec![]), None),
            Err(PolicyError::Empty { parameter: "priority" })
        );
        assert!(matches!(
            Policy::from_parts("priority", Some(vec!["a".into(), "a".into()]), None),
            Err(PolicyError::Duplicate { .. })
        ));
        assert!(matches!(
            Policy::from_parts("priority", Some(vec![String::new()]), None),
            Err(PolicyError::Member { .. })
        ));
        assert!(matches!(
            Policy::from_parts("ordered", None, Some(vec![json!("a"), json!("a")])),
            Err(PolicyError::Duplicate { parameter: "order", .. })
        ));
        assert!(matches!(
            Policy::from_parts("ordered", None, Some(vec![json!(null)])),
            Err(PolicyError::Member { .. })
        ));
        assert!(matches!(
            Policy::from_parts("ordered", None, Some(vec![json!("x".repeat(2000))])),
            Err(PolicyError::Member { .. })
        ));
        assert_eq!(
            Policy::from_parts("max", Some(vec!["a".into()]), None),
            Err(PolicyError::Unexpected { policy: "max", parameter: "priority" })
        );
        assert_eq!(
            Policy::from_parts("ordered", Some(vec!["a".into()]), Some(vec![json!(1)])),
            Err(PolicyError::Unexpected { policy: "ordered", parameter: "priority" })
        );
        let many: Vec<Value> = (0..=LIST_MEMBERS_MAX).map(|index| json!(index)).collect();
        assert!(matches!(Policy::ordered(many), Err(PolicyError::TooManyMembers { .. })));
        // `2` and `2.0` are different members.
        assert!(Policy::ordered(vec![json!(2), json!(2.0)]).is_ok());
    }

    #[test]
    fn policies_round_trip_through_json_and_message_pack() {
        let policies = [
            Policy::Lww,
            Policy::Latest,
            Policy::priority(vec!["hq".into()]).expect("valid"),
            Policy::Max,
            Policy::Min,
            Policy::Counter,
            Policy::Union,
            Policy::ordered(vec![json!("a"), json!(1)]).expect("valid"),
        ];
        for policy in policies {
            let text = serde_json::to_string(&policy).expect("encodes");
            assert_eq!(serde_json::from_str::<Policy>(&text).ok(), Some(policy.clone()), "{text}");
            let bytes = rmp_serde::to_vec_named(&policy).expect("encodes");
            assert_eq!(rmp_serde::from_slice::<Policy>(&bytes).ok(), Some(policy));
        }
        assert!(serde_json::from_str::<Policy>(r#"{"policy":"ordered","order":[]}"#).is_err());
        assert!(serde_json::from_str::<Policy>(r#"{"policy":"lww","extra":1}"#).is_err());
    }

    #[test]
    fn operation_ids_sort_like_automerge_and_serialize_by_format() {
        assert!(OperationId::from_lamport(2, &[0]) > OperationId::from_lamport(1, &[255, 255]));
        assert!(OperationId::from_lamport(1, &[2]) > OperationId::from_lamport(1, &[1]));
        let operation = OperationId::from_lamport(258, &[0xab]);
        assert_eq!(serde_json::to_string(&operation).ok(), Some("\"0000000000000102ab\"".to_owned()));
        let bytes = rmp_serde::to_vec(&operation).expect("encodes");
        assert_eq!(rmp_serde::from_slice::<OperationId>(&bytes).ok(), Some(operation));
        assert!(serde_json::from_str::<OperationId>("\"zz\"").is_err());
    }
}
