//! Tests conflict resolution (`crdt::policy`) as replicas use it: every policy resolves a set of
//! concurrent candidates identically whatever their order and duplicates; two and three replicas
//! that receive the same concurrent writes in different delivery orders (as candidate sets, and
//! as real automerge documents) resolve identical values; automerge's own winner is what `lww`
//! picks; and each policy's promise holds (`ordered` never resolves below a candidate's rank,
//! `max` never below a number, `union` keeps every element, ...).
//!
//! 1,000 cases per property by default; `PROPTEST_CASES` raises it.

use std::collections::BTreeMap;

use automerge::transaction::CommitOptions;
use automerge::{ActorId, Automerge, ObjId, ROOT, ReadDoc};
use crdt::canonical::{canonical, compare_numbers};
use crdt::clock::Timestamp;
use crdt::json;
use crdt::policy::{Candidate, OperationId, Policy, Resolution, normalize, resolve};
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;

/// The proptest configuration: `cases` cases unless `PROPTEST_CASES` says otherwise.
fn config(cases: u32) -> ProptestConfig {
    let mut config = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    config
}

const NODES: [&str; 5] = ["hq", "store-1", "store-2", "store-3", "depot"];

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

/// Scalars from small pools, so values collide, lattices match and numbers tie across
/// representations (`1` and `1.0`).
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => prop::sample::select(vec!["draft", "approved", "shipped", "lost", ""]).prop_map(Value::from),
        3 => (-3i64..4).prop_map(Value::from),
        1 => prop::sample::select(vec![1.0, -0.0, 2.5, -1.5, 1e300]).prop_map(Value::from),
        1 => Just(Value::from(u64::MAX)),
        1 => any::<bool>().prop_map(Value::Bool),
        1 => Just(Value::Null),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => scalar(),
        3 => prop::collection::vec(scalar(), 0..4).prop_map(Value::Array),
        1 => prop::collection::btree_map("[a-c]", scalar(), 0..3).prop_map(|map| Value::Object(map.into_iter().collect())),
    ]
}

/// Candidates with few distinct timestamps and operation ids, so every tie-break is exercised,
/// including (malformed) equal operation ids with different values.
fn candidate() -> impl Strategy<Value = Candidate> {
    (value(), prop::sample::select(NODES.to_vec()), 0u64..4, 0u32..2, 0u64..6, 1u8..4).prop_map(
        |(value, origin, wall_ms, logical, counter, actor)| {
            let timestamp = Timestamp { wall_ms, logical };
            Candidate::new(value, origin, timestamp, OperationId::from_lamport(counter, &[actor; 16]))
        },
    )
}

fn policy() -> impl Strategy<Value = Policy> {
    let lattice = prop::sample::subsequence(
        vec![
            Value::from("draft"),
            Value::from("approved"),
            Value::from("shipped"),
            Value::from(1),
            Value::from(2.5),
            Value::from(true),
        ],
        1..6,
    )
    .prop_shuffle();
    let priority = prop::sample::subsequence(NODES.to_vec(), 1..5).prop_shuffle();
    prop_oneof![
        Just(Policy::Lww),
        Just(Policy::Latest),
        priority.prop_map(|nodes| Policy::priority(nodes.into_iter().map(String::from).collect()).expect("valid")),
        Just(Policy::Max),
        Just(Policy::Min),
        Just(Policy::Counter),
        Just(Policy::Union),
        lattice.prop_map(|members| Policy::ordered(members).expect("valid")),
    ]
}

/// The candidates, and the same set in another order with some repeated.
fn shuffled_with_duplicates() -> impl Strategy<Value = (Vec<Candidate>, Vec<Candidate>)> {
    prop::collection::vec(candidate(), 1..8).prop_flat_map(|candidates| {
        let count = candidates.len();
        let repeats = prop::collection::vec(0..count, 0..6);
        (Just(candidates.clone()), repeats).prop_flat_map(move |(candidates, repeats)| {
            let mut other = candidates.clone();
            other.extend(repeats.iter().map(|&index| candidates[index].clone()));
            (Just(candidates), Just(other).prop_shuffle())
        })
    })
}

// ---------------------------------------------------------------------------------------------
// Replicas as candidate sets
// ---------------------------------------------------------------------------------------------

/// One replica's view of a field: every concurrent write it has received, in arrival order,
/// duplicates included (gossip delivers some writes twice).
#[derive(Debug, Clone, Default)]
struct SetReplica {
    received: Vec<Candidate>,
}

/// Runs a gossip schedule over `replicas`: each replica first makes its own writes, then each
/// step copies everything replica `from` holds to replica `to` (in `from`'s order, reversed when
/// `reverse`), and a final round delivers everything everywhere. Returns each replica's resolution.
fn gossip(writes: &[Vec<Candidate>], steps: &[(usize, usize, bool)], policy: &Policy) -> Vec<Option<Resolution>> {
    let count = writes.len();
    let mut replicas: Vec<SetReplica> = writes.iter().map(|own| SetReplica { received: own.clone() }).collect();
    for &(from, to, reverse) in steps {
        let (from, to) = (from % count, to % count);
        let mut batch = replicas[from].received.clone();
        if reverse {
            batch.reverse();
        }
        replicas[to].received.extend(batch);
    }
    for to in 0..count {
        for from in (0..count).rev() {
            let batch = replicas[from].received.clone();
            replicas[to].received.extend(batch);
        }
    }
    replicas.iter().map(|replica| resolve(policy, &replica.received)).collect()
}

/// Each replica's own writes, and gossip steps (from, to, reversed).
type Schedule = (Vec<Vec<Candidate>>, Vec<(usize, usize, bool)>);

fn replica_schedule(replicas: usize) -> impl Strategy<Value = Schedule> {
    (
        prop::collection::vec(prop::collection::vec(candidate(), 0..4), replicas),
        prop::collection::vec((0..replicas, 0..replicas, any::<bool>()), 0..8),
    )
        .prop_filter("someone writes", |(writes, _)| writes.iter().any(|own| !own.is_empty()))
}

// ---------------------------------------------------------------------------------------------
// Replicas as automerge documents
// ---------------------------------------------------------------------------------------------

/// A replica holding the field as automerge does: node name `NODES[index]`, actor `index + 1`.
fn document(index: usize) -> Automerge {
    Automerge::new().with_actor(ActorId::from(&[u8::try_from(index + 1).unwrap_or(0); 16][..]))
}

/// `value` written to field `f` on `document`, as one change at `wall_ms`; its change bytes.
fn write(document: &mut Automerge, value: &Value, wall_ms: u64) -> Vec<u8> {
    let heads = document.get_heads();
    let mut transaction = document.transaction();
    json::put_fresh(&mut transaction, &ROOT, "f".into(), value).expect("a fresh value is written");
    transaction.commit_with(CommitOptions::default().with_time(i64::try_from(wall_ms).unwrap_or(i64::MAX)));
    document.save_after(&heads)
}

/// The field's concurrent values as candidates, the way the node builds them: operation id from
/// the automerge op id, origin from the actor, timestamp from `timestamps` (by actor byte).
fn candidates_of(document: &Automerge, timestamps: &BTreeMap<u8, Timestamp>) -> Vec<Candidate> {
    let all = document.get_all(ROOT, "f").expect("the field reads");
    all.iter()
        .map(|(value, id)| {
            let ObjId::Id(counter, actor, _) = id else { panic!("a field value has an op id") };
            let actor_byte = actor.to_bytes()[0];
            let mut conflicts = Vec::new();
            let json = json::read_value(document, value, id, "/f", 0, &mut conflicts).expect("the value reads");
            let origin = NODES[usize::from(actor_byte) - 1];
            let timestamp = timestamps.get(&actor_byte).copied().unwrap_or_default();
            Candidate::new(json, origin, timestamp, OperationId::from_lamport(*counter, actor.to_bytes()))
        })
        .collect()
}

/// What automerge itself shows for the field.
fn automerge_winner(document: &Automerge) -> Value {
    let (value, id) = document.get(ROOT, "f").expect("the field reads").expect("the field is there");
    let mut conflicts = Vec::new();
    json::read_value(document, &value, &id, "/f", 0, &mut conflicts).expect("the value reads")
}

/// Each writer's writes (sequential on the writer: only its last is a candidate), each writer's
/// clock, each replica's delivery order, and the policy.
type Scenario = (Vec<Vec<Value>>, Vec<u64>, Vec<Vec<usize>>, Policy);

fn automerge_scenario(replicas: usize) -> impl Strategy<Value = Scenario> {
    (
        prop::collection::vec(prop::collection::vec(value(), 1..3), replicas),
        prop::collection::vec(0u64..3, replicas),
        prop::collection::vec(Just((0..replicas).collect::<Vec<usize>>()).prop_shuffle(), replicas),
        policy(),
    )
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(1000))]

    /// Every policy resolves a set the same way whatever the order and the duplicates.
    #[test]
    fn order_and_duplicates_do_not_change_the_resolution(
        (candidates, shuffled) in shuffled_with_duplicates(),
        policy in policy(),
    ) {
        let expected = resolve(&policy, &candidates);
        prop_assert!(expected.is_some());
        prop_assert_eq!(resolve(&policy, &shuffled), expected.clone());
        let mut reversed = candidates.clone();
        reversed.reverse();
        prop_assert_eq!(resolve(&policy, &reversed), expected);
        prop_assert_eq!(normalize(&shuffled), normalize(&candidates));
    }

    /// Two replicas that receive the same concurrent writes in different orders resolve alike.
    #[test]
    fn two_replicas_resolve_identically((writes, steps) in replica_schedule(2), policy in policy()) {
        let resolutions = gossip(&writes, &steps, &policy);
        prop_assert!(resolutions[0].is_some());
        prop_assert_eq!(&resolutions[0], &resolutions[1]);
        let everything: Vec<Candidate> = writes.concat();
        prop_assert_eq!(&resolutions[0], &resolve(&policy, &everything));
    }

    /// Three replicas that receive the same concurrent writes in different orders resolve alike.
    #[test]
    fn three_replicas_resolve_identically((writes, steps) in replica_schedule(3), policy in policy()) {
        let resolutions = gossip(&writes, &steps, &policy);
        prop_assert!(resolutions[0].is_some());
        prop_assert_eq!(&resolutions[0], &resolutions[1]);
        prop_assert_eq!(&resolutions[1], &resolutions[2]);
    }

    /// Each policy keeps its promise: the winner is a candidate (or, for `union`, the union),
    /// winner and losers split the set, and no candidate outranks the winner.
    #[test]
    fn each_policy_keeps_its_promise(candidates in prop::collection::vec(candidate(), 1..8), policy in policy()) {
        let resolution = resolve(&policy, &candidates).expect("candidates were given");
        let set = normalize(&candidates);
        check_promise(&policy, &set, &resolution)?;
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Two and three automerge replicas make concurrent writes to one field, receive each
    /// other's changes in different orders, and resolve identical values under every policy;
    /// `lww` is exactly automerge's own winner.
    #[test]
    fn automerge_replicas_resolve_identically(
        (values, walls, orders, policy) in prop_oneof![automerge_scenario(2), automerge_scenario(3)],
    ) {
        let count = values.len();
        let mut documents: Vec<Automerge> = (0..count).map(document).collect();
        let mut changes: Vec<Vec<Vec<u8>>> = vec![Vec::new(); count];
        let mut timestamps = BTreeMap::new();
        for (index, writes) in values.iter().enumerate() {
            for (step, value) in writes.iter().enumerate() {
                let wall_ms = walls[index] * 10 + step as u64;
                changes[index].push(write(&mut documents[index], value, wall_ms));
                let actor = u8::try_from(index + 1).unwrap_or(0);
                timestamps.insert(actor, Timestamp { wall_ms, logical: 0 });
            }
        }
        for (index, order) in orders.iter().enumerate() {
            for &from in order.iter().filter(|&&from| from != index) {
                // Changes of one writer travel together, last first: automerge waits for
                // the dependencies it needs.
                for change in changes[from].iter().rev() {
                    documents[index].load_incremental(change).expect("the change applies");
                }
            }
        }
        let mut resolutions = Vec::new();
        for document in &documents {
            let candidates = candidates_of(document, &timestamps);
            prop_assert_eq!(candidates.len(), count, "every writer's last value is a candidate");
            let lww = resolve(&Policy::Lww, &candidates).expect("candidates");
            prop_assert_eq!(&lww.value, &automerge_winner(document));
            resolutions.push(resolve(&policy, &candidates));
        }
        for resolution in &resolutions[1..] {
            prop_assert_eq!(resolution, &resolutions[0]);
        }
    }
}

/// The policy-specific promise of one resolution.
fn check_promise(policy: &Policy, set: &[Candidate], resolution: &Resolution) -> Result<(), TestCaseError> {
    if let (Policy::Union, true) = (policy, set.iter().any(|candidate| candidate.value.is_array())) {
        return check_union(set, resolution);
    }
    let winner = resolution.winner.clone().ok_or_else(|| TestCaseError::fail("a winner is chosen"))?;
    prop_assert_eq!(&resolution.value, &winner.value);
    prop_assert_eq!(resolution.losers.len() + 1, set.len());
    prop_assert!(set.contains(&winner));
    prop_assert!(!resolution.losers.contains(&winner));
    for candidate in set {
        match policy {
            Policy::Lww | Policy::Counter | Policy::Union => prop_assert!(candidate.operation <= winner.operation),
            Policy::Latest => prop_assert!(candidate.timestamp <= winner.timestamp),
            Policy::Priority(_) => {
                let standing = |origin: &str| match policy {
                    Policy::Priority(nodes) => {
                        nodes.iter().position(|node| node == origin).map_or(0, |index| nodes.len() - index)
                    }
                    _ => 0,
                };
                prop_assert!(standing(&candidate.origin) <= standing(&winner.origin));
            }
            Policy::Max | Policy::Min => {
                if let Value::Number(number) = &candidate.value {
                    let Value::Number(best) = &winner.value else {
                        return Err(TestCaseError::fail("a number beats a non-number"));
                    };
                    let order = compare_numbers(number, best);
                    let kept = if matches!(policy, Policy::Max) { order.is_le() } else { order.is_ge() };
                    prop_assert!(kept, "{} beats the winner {}", number, best);
                }
            }
            Policy::Ordered(_) => {
                prop_assert!(policy.lattice_rank(&candidate.value) <= policy.lattice_rank(&winner.value))
            }
        }
    }
    Ok(())
}

/// `union`: every element of every array candidate, once, sorted; non-arrays lose.
fn check_union(set: &[Candidate], resolution: &Resolution) -> Result<(), TestCaseError> {
    prop_assert!(resolution.winner.is_none());
    let Value::Array(elements) = &resolution.value else {
        return Err(TestCaseError::fail("union of arrays is an array"));
    };
    let texts: Vec<String> = elements.iter().map(canonical).collect();
    prop_assert!(texts.windows(2).all(|pair| pair[0] < pair[1]), "sorted and distinct: {:?}", texts);
    for candidate in set {
        match &candidate.value {
            Value::Array(items) => {
                for item in items {
                    prop_assert!(texts.contains(&canonical(item)));
                }
            }
            _ => prop_assert!(resolution.losers.contains(candidate)),
        }
    }
    Ok(())
}

#[test]
fn the_issue_example_resolves_as_documented() {
    let candidate = |value: Value, origin: &str, wall_ms: u64, counter: u64| {
        Candidate::new(value, origin, Timestamp { wall_ms, logical: 0 }, OperationId::from_lamport(counter, &[1]))
    };
    let order = Policy::ordered(vec!["draft".into(), "approved".into(), "shipped".into()]).expect("valid");
    let status = [candidate("approved".into(), "hq", 20, 5), candidate("shipped".into(), "store-1", 10, 4)];
    assert_eq!(resolve(&order, &status).map(|resolution| resolution.value), Some("shipped".into()));
    let owner = Policy::priority(vec!["hq".into(), "store-1".into()]).expect("valid");
    let owners = [candidate("alice".into(), "store-1", 30, 9), candidate("bob".into(), "hq", 10, 2)];
    assert_eq!(resolve(&owner, &owners).map(|resolution| resolution.value), Some("bob".into()));
    assert_eq!(resolve(&Policy::Latest, &owners).map(|resolution| resolution.value), Some("alice".into()));
}
