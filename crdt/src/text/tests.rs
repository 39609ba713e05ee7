//! Tests of the text module: convergence, idempotence, sync, persistence, the bounds scanner and
//! the type-nesting guard, and property tests that untrusted bytes never panic.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use yrs::types::xml::{Xml, XmlElementPrelim, XmlFragment, XmlTextPrelim};
use yrs::{
    Any, Array, ArrayPrelim, ClientID, Doc, Map, MapPrelim, Options, ReadTxn, StateVector, Text, TextPrelim, Transact,
};

use super::*;

fn limits() -> TextLimits {
    TextLimits::default()
}

fn any_value(json: &str) -> Any {
    Any::from_json(json).expect("test JSON parses")
}

fn state_of(doc: &Doc) -> Vec<u8> {
    doc.transact().encode_state_as_update_v1(&StateVector::default())
}

/// A varint as lib0 writes it.
fn var(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn string(value: &str, out: &mut Vec<u8>) {
    var(value.len() as u64, out);
    out.extend_from_slice(value.as_bytes());
}

/// An update with one item of client 7 at clock 0 in root map `m` under key `k`, whose content
/// (info's low bits and the bytes after the parent) is given, and an empty delete set.
fn root_map_item(content_ref: u8, content: &[u8]) -> Vec<u8> {
    let mut update = vec![1, 1, 7, 0, 0b0010_0000 | content_ref, 1];
    string("m", &mut update);
    string("k", &mut update);
    update.extend_from_slice(content);
    update.push(0);
    update
}

/// `Any` content holding one value: `depth` arrays, each holding the next, around a null.
fn nested_any(depth: usize) -> Vec<u8> {
    let mut content = vec![1];
    for _ in 0..depth {
        content.extend_from_slice(&[117, 1]);
    }
    content.push(126);
    root_map_item(8, &content)
}

/// Updates made with yrs itself: texts with formatting and embeds, maps and arrays with nested
/// `Any` values, nested shared types, XML, a subdocument, and deletions.
fn yrs_updates() -> Vec<Vec<u8>> {
    let doc = Doc::with_client_id(11);
    let mut updates = Vec::new();
    let text = doc.get_or_insert_text("text");
    let map = doc.get_or_insert_map("map");
    let array = doc.get_or_insert_array("array");
    let fragment = doc.get_or_insert_xml_fragment("xml");
    let mut step = |change: &dyn Fn(&mut yrs::TransactionMut<'_>)| {
        let mut txn = doc.transact_mut();
        change(&mut txn);
        updates.push(txn.encode_update_v1());
    };
    step(&|txn| text.insert(txn, 0, "hello world, héllo 🌍"));
    step(&|txn| {
        let bold: HashMap<Arc<str>, Any> = HashMap::from([("bold".into(), Any::Bool(true))]);
        text.insert_with_attributes(txn, 5, " there", bold);
        let link: HashMap<Arc<str>, Any> =
            HashMap::from([("link".into(), any_value(r#"{"href":"x","n":[1,2,{"a":null}]}"#))]);
        text.format(txn, 0, 3, link);
        text.insert_embed(txn, 2, any_value(r#"{"image":{"src":"a.png","size":[1,2]}}"#));
    });
    step(&|txn| text.remove_range(txn, 1, 3));
    step(&|txn| {
        map.insert(txn, "number", 42);
        map.insert(txn, "big", any_value("12345678901"));
        map.insert(txn, "float", 1.5);
        map.insert(txn, "string", "value");
        map.insert(txn, "nested", any_value(r#"{"a":{"b":{"c":[1,[2,[3,{"d":"e"}]]]}},"list":[true,false,null]}"#));
        map.insert(txn, "buffer", Any::Buffer(Arc::from(vec![1u8, 2, 3].as_slice())));
        map.insert(txn, "negative", -123_456);
    });
    step(&|txn| {
        array.insert_range(
            txn,
            0,
            [any_value("1"), any_value(r#"[[[]]]"#), any_value(r#"{"x":{"y":[]}}"#), any_value("\"s\"")],
        );
        let inner = array.insert(txn, 1, MapPrelim::default());
        inner.insert(txn, "deep", any_value("[1,[2]]"));
        let list = inner.insert(txn, "list", ArrayPrelim::default());
        list.insert(txn, 0, TextPrelim::new("inner text"));
    });
    step(&|txn| {
        array.remove_range(txn, 0, 2);
        map.remove(txn, "float");
        map.insert(txn, "number", 43);
    });
    step(&|txn| {
        let paragraph = fragment.insert(txn, 0, XmlElementPrelim::empty("p"));
        paragraph.insert(txn, 0, XmlTextPrelim::new("xml text"));
        paragraph.insert_attribute(txn, "class", "lead");
    });
    step(&|txn| {
        let options = Options::with_guid_and_client_id("subdoc-guid".into(), ClientID::new(12));
        map.insert(txn, "subdoc", Doc::with_options(options));
    });
    updates.push(state_of(&doc));
    updates
}

#[test]
fn concurrent_edits_converge_in_any_order() {
    let mut a = TextDocument::new(1);
    let mut b = TextDocument::new(2);
    let a1 = a.insert_text("t", 0, "hello").expect("insert");
    let b1 = b.insert_text("t", 0, "world").expect("insert");
    let a2 = a.insert_text("t", 5, " there").expect("insert");
    let b2 = b.delete_text("t", 1, 2).expect("delete");
    let b3 = b.insert_text("t", 0, "¡").expect("insert");

    for update in [&b1, &b2, &b3] {
        assert!(a.apply_update(update, &limits()).expect("apply"));
    }
    for update in [&a1, &a2] {
        assert!(b.apply_update(update, &limits()).expect("apply"));
    }
    assert_eq!(a.text("t"), b.text("t"));
    assert_eq!(a.digest(), b.digest());

    // A third replica receiving everything in yet another order, some of it out of order.
    let mut c = TextDocument::new(3);
    for update in [&a2, &b3, &b2, &a1, &b1] {
        c.apply_update(update, &limits()).expect("apply");
    }
    assert_eq!(c.text("t"), a.text("t"));
    assert_eq!(c.digest(), a.digest());

    // More concurrent edits on top, crossing deletes.
    let a3 = a.delete_text("t", 0, 3).expect("delete");
    let c1 = c.insert_text("t", 2, "XY").expect("insert");
    a.apply_update(&c1, &limits()).expect("apply");
    c.apply_update(&a3, &limits()).expect("apply");
    b.apply_update(&c1, &limits()).expect("apply");
    b.apply_update(&a3, &limits()).expect("apply");
    assert_eq!(a.text("t"), c.text("t"));
    assert_eq!(a.text("t"), b.text("t"));
    assert_eq!(a.digest(), c.digest());
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), TextDocument::new(1).digest());
}

#[test]
fn digest_ignores_how_structs_were_split() {
    // One replica types character by character; another receives the result in one update.
    let mut typist = TextDocument::new(5);
    let mut updates = Vec::new();
    for (index, character) in "abcdef".chars().enumerate() {
        updates.push(typist.insert_text("t", index as u32, &character.to_string()).expect("insert"));
    }
    updates.push(typist.delete_text("t", 2, 1).expect("delete"));
    let mut one_by_one = TextDocument::new(6);
    for update in &updates {
        one_by_one.apply_update(update, &limits()).expect("apply");
    }
    let mut whole = TextDocument::new(7);
    whole.apply_update(&typist.save(), &limits()).expect("apply");
    let mut reversed = TextDocument::new(8);
    for update in updates.iter().rev() {
        reversed.apply_update(update, &limits()).expect("apply");
    }
    assert_eq!(whole.text("t"), "abdef");
    for other in [&one_by_one, &whole, &reversed] {
        assert_eq!(other.text("t"), typist.text("t"));
        assert_eq!(other.digest(), typist.digest());
    }

    // The same holds for the mixed content made with yrs, applied whole or step by step.
    let updates = yrs_updates();
    let (state, steps) = updates.split_last().expect("updates");
    let mut stepwise = TextDocument::new(9);
    for step in steps {
        stepwise.apply_update(step, &limits()).expect("apply step");
    }
    let mut at_once = TextDocument::new(10);
    at_once.apply_update(state, &limits()).expect("apply state");
    assert_eq!(stepwise.digest(), at_once.digest());
    assert_eq!(stepwise.text("text"), at_once.text("text"));
}

#[test]
fn applying_twice_is_a_no_op() {
    let mut author = TextDocument::new(1);
    let update = author.insert_text("t", 0, "once").expect("insert");
    let mut replica = TextDocument::new(2);
    assert!(replica.apply_update(&update, &limits()).expect("apply"));
    let digest = replica.digest();
    assert!(!replica.apply_update(&update, &limits()).expect("apply again"));
    assert_eq!(replica.digest(), digest);
    // Deletions too.
    let delete = author.delete_text("t", 0, 1).expect("delete");
    assert!(replica.apply_update(&delete, &limits()).expect("apply delete"));
    assert!(!replica.apply_update(&delete, &limits()).expect("apply delete again"));
    assert_eq!(replica.text("t"), "nce");
    // An empty update changes nothing.
    assert!(!replica.apply_update(&[0, 0], &limits()).expect("empty update"));
}

#[test]
fn diff_brings_a_replica_up_to_date() {
    let mut source = TextDocument::new(1);
    let mut behind = TextDocument::new(2);
    let first = source.insert_text("t", 0, "shared ").expect("insert");
    behind.apply_update(&first, &limits()).expect("apply");
    source.insert_text("t", 7, "and new").expect("insert");
    source.delete_text("t", 0, 1).expect("delete");
    behind.insert_text("t", 0, ">").expect("insert");

    let diff = source.diff(&behind.state_vector()).expect("diff");
    validate_update(&diff, &limits()).expect("diff passes the bounds");
    assert!(behind.apply_update(&diff, &limits()).expect("apply diff"));
    let back = behind.diff(&source.state_vector()).expect("diff");
    source.apply_update(&back, &limits()).expect("apply diff");
    assert_eq!(source.text("t"), behind.text("t"));
    assert_eq!(source.digest(), behind.digest());

    // From nothing: the empty state vector asks for everything.
    let mut empty = TextDocument::new(3);
    empty.apply_update(&source.diff(&[0]).expect("diff"), &limits()).expect("apply");
    assert_eq!(empty.digest(), source.digest());
    // Nothing left to send once up to date.
    assert!(!behind.apply_update(&source.diff(&behind.state_vector()).expect("diff"), &limits()).expect("apply"));
}

#[test]
fn diff_refuses_bad_state_vectors() {
    let document = TextDocument::new(1);
    for bad in
        [&[][..], &[1], &[1, 5], &[2, 5, 1], &[1, 5, 1, 9], &[1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x10, 0]]
    {
        assert!(document.diff(bad).is_err(), "{bad:?}");
    }
    assert!(matches!(document.diff(&[2, 5, 1, 5, 2]), Err(TextError::DuplicateClient { .. })));
    let huge = vec![0u8; STATE_VECTOR_BYTES_MAX + 1];
    assert!(matches!(document.diff(&huge), Err(TextError::StateVectorTooLarge { .. })));
}

#[test]
fn save_and_load_keep_pending_updates() {
    let mut author = TextDocument::new(1);
    let first = author.insert_text("t", 0, "ab").expect("insert");
    let second = author.insert_text("t", 2, "cd").expect("insert");
    let deletion = author.delete_text("t", 0, 1).expect("delete");

    // The second update depends on the first, which has not arrived: it is held pending.
    let mut replica = TextDocument::new(2);
    assert!(replica.apply_update(&second, &limits()).expect("pending apply"));
    assert!(!replica.apply_update(&second, &limits()).expect("pending again"));
    assert!(replica.apply_update(&deletion, &limits()).expect("pending deletion"));
    assert_eq!(replica.text("t"), "");
    assert_ne!(replica.digest(), TextDocument::new(2).digest());

    let saved = replica.save();
    let mut loaded = TextDocument::load(2, &saved, &[], &limits()).expect("load");
    assert_eq!(loaded.digest(), replica.digest());
    assert!(loaded.apply_update(&first, &limits()).expect("fill the gap"));
    assert_eq!(loaded.text("t"), "bcd");
    assert_eq!(loaded.digest(), author.digest());

    // Loading with the later updates replayed gives the same.
    let replayed = TextDocument::load(2, &saved, &[&first], &limits()).expect("load with updates");
    assert_eq!(replayed.digest(), author.digest());
    // An empty saved state is an empty document.
    let fresh = TextDocument::load(2, &[], &[&first, &second], &limits()).expect("load from updates");
    assert_eq!(fresh.text("t"), "abcd");
    // A saved state past the limit is refused.
    let tight = TextLimits { document_bytes_max: 4, ..limits() };
    assert!(matches!(TextDocument::load(2, &saved, &[], &tight), Err(TextError::DocumentTooLarge { .. })));
    // So is a bad update on disk.
    assert!(TextDocument::load(2, &saved, &[&[1, 2, 3]], &limits()).is_err());
}

#[test]
fn documents_can_move_between_threads() {
    fn assert_send<T: Send + 'static>() {}
    assert_send::<TextDocument>();
    assert_send::<TextError>();
}

#[test]
fn client_ids_are_masked_to_53_bits() {
    let document = TextDocument::new(u64::MAX);
    assert_eq!(document.client_id(), CLIENT_ID_MAX);
    let mut document = TextDocument::new((1 << 53) + 5);
    assert_eq!(document.client_id(), 5);
    let update = document.insert_text("t", 0, "x").expect("insert");
    validate_update(&update, &limits()).expect("valid");
}

#[test]
fn local_edits_check_their_positions() {
    let mut document = TextDocument::new(1);
    assert!(matches!(document.insert_text("t", 1, "x"), Err(TextError::IndexOutOfRange { index: 1, length: 0 })));
    document.insert_text("t", 0, "a🌍b").expect("insert");
    assert_eq!(document.text("t"), "a🌍b");
    assert!(matches!(document.insert_text("t", 2, "x"), Err(TextError::SplitsSurrogatePair { index: 2 })));
    assert!(matches!(document.delete_text("t", 1, 1), Err(TextError::SplitsSurrogatePair { index: 2 })));
    assert!(matches!(document.delete_text("t", 3, 2), Err(TextError::IndexOutOfRange { .. })));
    assert!(matches!(document.delete_text("t", 3, u32::MAX), Err(TextError::IndexOutOfRange { .. })));
    document.delete_text("t", 1, 2).expect("delete the pair");
    assert_eq!(document.text("t"), "ab");
    document.insert_text("t", 2, "c").expect("append");
    assert_eq!(document.text("t"), "abc");
    assert_eq!(document.text("absent"), "");
}

#[test]
fn the_scanner_accepts_what_yrs_writes() {
    let updates = yrs_updates();
    let mut document = TextDocument::new(99);
    for update in &updates {
        validate_update(update, &limits()).expect("yrs update passes the bounds");
        document.apply_update(update, &limits()).expect("yrs update applies");
    }
    assert!(document.text("text").contains("there"));
    let saved = document.save();
    validate_update(&saved, &limits()).expect("saved state passes the bounds");
    let loaded = TextDocument::load(99, &saved, &[], &limits()).expect("load");
    assert_eq!(loaded.digest(), document.digest());
    // Its state vector passes too.
    validate_state_vector(&document.state_vector()).expect("state vector passes");
}

#[test]
fn any_nesting_is_bounded() {
    let depth = limits().nesting_depth_max;
    validate_update(&nested_any(depth), &limits()).expect("at the limit");
    assert!(matches!(validate_update(&nested_any(depth + 1), &limits()), Err(TextError::NestingTooDeep { .. })));

    // Ten thousand levels would overflow yrs's recursive decoder: refused before it.
    let attack = nested_any(10_000);
    assert!(matches!(validate_update(&attack, &limits()), Err(TextError::NestingTooDeep { .. })));
    let mut document = TextDocument::new(1);
    document.insert_text("t", 0, "kept").expect("insert");
    let digest = document.digest();
    assert!(matches!(document.apply_update(&attack, &limits()), Err(TextError::NestingTooDeep { .. })));
    assert_eq!(document.digest(), digest);

    // Settings above the ceiling count as the ceiling.
    let generous = TextLimits { nesting_depth_max: usize::MAX, ..limits() };
    validate_update(&nested_any(NESTING_DEPTH_CEILING), &generous).expect("at the ceiling");
    assert!(validate_update(&nested_any(NESTING_DEPTH_CEILING + 1), &generous).is_err());

    // Nested maps count the same way, and so does JSON in embeds.
    let mut maps = vec![1];
    for _ in 0..=depth {
        maps.extend_from_slice(&[118, 1, 1, b'k']);
    }
    maps.push(126);
    assert!(matches!(validate_update(&root_map_item(8, &maps), &limits()), Err(TextError::NestingTooDeep { .. })));
    let mut json = Vec::new();
    string(&format!("{}{}", "[".repeat(depth + 1), "]".repeat(depth + 1)), &mut json);
    assert!(matches!(validate_update(&root_map_item(5, &json), &limits()), Err(TextError::NestingTooDeep { .. })));
    let mut json = Vec::new();
    string(&format!("{}{}", "[".repeat(depth), "]".repeat(depth)), &mut json);
    validate_update(&root_map_item(5, &json), &limits()).expect("JSON at the limit");
    // Brackets inside JSON strings do not count.
    let mut json = Vec::new();
    string(&format!("\"{}\\\"{}\"", "[".repeat(100), "{".repeat(100)), &mut json);
    validate_update(&root_map_item(5, &json), &limits()).expect("brackets in a string");
}

#[test]
fn the_scanner_refuses_malformed_updates() {
    let valid = root_map_item(4, &[2, b'h', b'i']);
    validate_update(&valid, &limits()).expect("valid");

    // A length pointing past the end.
    let past_end = root_map_item(4, &[100, b'h', b'i']);
    assert!(matches!(validate_update(&past_end, &limits()), Err(TextError::LengthPastEnd { .. })));
    // A huge count of structs.
    assert!(matches!(
        validate_update(&[1, 0xff, 0xff, 0xff, 0x0f, 7, 0], &limits()),
        Err(TextError::CountPastEnd { .. })
    ));
    // A huge `Any` array.
    let huge_array = root_map_item(8, &[1, 117, 0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert!(matches!(validate_update(&huge_array, &limits()), Err(TextError::CountPastEnd { .. })));
    // Oversize input.
    let tight = TextLimits { update_bytes_max: valid.len() - 1, ..limits() };
    assert!(matches!(validate_update(&valid, &tight), Err(TextError::UpdateTooLarge { .. })));
    // Trailing bytes.
    let mut trailing = valid.clone();
    trailing.push(0);
    assert!(matches!(validate_update(&trailing, &limits()), Err(TextError::TrailingBytes { .. })));
    // A client id past 53 bits (yrs debug-asserts it).
    let mut big_client = vec![1, 1];
    var(1 << 53, &mut big_client);
    big_client.extend_from_slice(&[0, 0, 1, 0]);
    assert!(matches!(validate_update(&big_client, &limits()), Err(TextError::ClientIdTooLarge { .. })));
    // A varint of 11 bytes, and one that loses bits.
    let long_varint = [1, 1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0];
    assert!(matches!(validate_update(&long_varint, &limits()), Err(TextError::InvalidVarint { .. })));
    let mut wide_clock = vec![1, 1, 7];
    var(1 << 33, &mut wide_clock);
    assert!(matches!(validate_update(&wide_clock, &limits()), Err(TextError::InvalidVarint { .. })));
    // A signed varint past 63 bits (yrs would shift by 69 or negate i64::MIN).
    let mut wide_integer = vec![1, 125, 0xc0];
    wide_integer.extend_from_slice(&[0x80; 8]);
    wide_integer.push(0x02);
    assert!(matches!(
        validate_update(&root_map_item(8, &wide_integer), &limits()),
        Err(TextError::InvalidVarint { .. })
    ));
    let mut largest_integer = vec![1, 125, 0xbf];
    largest_integer.extend_from_slice(&[0xff; 8]);
    largest_integer.push(0x01);
    validate_update(&root_map_item(8, &largest_integer), &limits()).expect("63-bit magnitude");
    // Clocks past i32::MAX.
    let mut late_clock = vec![1, 1, 7];
    var(u64::from(CLOCK_MAX_FOR_TESTS), &mut late_clock);
    late_clock.extend_from_slice(&[4, 1]);
    string("m", &mut late_clock);
    string("xy", &mut late_clock);
    late_clock.push(0);
    assert!(matches!(validate_update(&late_clock, &limits()), Err(TextError::ClockTooLarge { .. })));
    // Unknown and unsupported content.
    assert!(matches!(validate_update(&root_map_item(11, &[]), &limits()), Err(TextError::UnknownContentRef { .. })));
    assert!(matches!(
        validate_update(&root_map_item(0x10 | 4, &[0]), &limits()),
        Err(TextError::UnknownContentRef { .. })
    ));
    assert!(matches!(validate_update(&root_map_item(2, &[0]), &limits()), Err(TextError::UnsupportedContent { .. })));
    assert!(matches!(
        validate_update(&root_map_item(7, &[5, 0]), &limits()),
        Err(TextError::UnsupportedContent { .. })
    ));
    assert!(matches!(validate_update(&root_map_item(7, &[8]), &limits()), Err(TextError::UnknownTypeRef { .. })));
    assert!(matches!(validate_update(&root_map_item(8, &[1, 115]), &limits()), Err(TextError::UnknownAnyTag { .. })));
    // Bad UTF-8 and bad JSON.
    assert!(matches!(validate_update(&root_map_item(4, &[1, 0xff]), &limits()), Err(TextError::InvalidUtf8 { .. })));
    assert!(matches!(
        validate_update(&root_map_item(5, &[2, b'{', b'x']), &limits()),
        Err(TextError::InvalidJson { .. })
    ));
    // A zero-length garbage-collected range, a duplicate client, a parent info of 2.
    assert!(matches!(validate_update(&[1, 1, 7, 0, 0, 0, 0], &limits()), Err(TextError::EmptyBlock { .. })));
    assert!(matches!(
        validate_update(&[2, 1, 7, 0, 0, 1, 1, 7, 1, 0, 1, 0], &limits()),
        Err(TextError::DuplicateClient { .. })
    ));
    assert!(matches!(validate_update(&[1, 1, 7, 0, 4, 2], &limits()), Err(TextError::InvalidParentInfo { .. })));
    // An item pointing at a later struct of its own client.
    assert!(matches!(
        validate_update(&[1, 1, 7, 0, 0x84, 7, 0, 1, b'x', 0], &limits()),
        Err(TextError::ForwardReference { .. })
    ));
    // Delete sets: unordered, empty ranges, ranges past the clock limit.
    assert!(matches!(validate_update(&[0, 1, 7, 2, 5, 1, 0, 1], &limits()), Err(TextError::UnorderedDeleteSet { .. })));
    assert!(matches!(validate_update(&[0, 1, 7, 1, 5, 0], &limits()), Err(TextError::EmptyDeleteRange { .. })));
    let mut far_delete = vec![0, 1, 7, 1];
    var(u64::from(CLOCK_MAX_FOR_TESTS), &mut far_delete);
    far_delete.push(2);
    assert!(matches!(validate_update(&far_delete, &limits()), Err(TextError::ClockTooLarge { .. })));
    validate_update(&[0, 1, 7, 2, 0, 1, 1, 1], &limits()).expect("adjacent delete ranges");
}

/// `i32::MAX`, the largest clock the scanner accepts.
const CLOCK_MAX_FOR_TESTS: u32 = i32::MAX as u32;

#[test]
fn every_truncation_is_handled() {
    let updates = yrs_updates();
    let state = updates.last().expect("state");
    let mut document = TextDocument::new(1);
    document.insert_text("text", 0, "base").expect("insert");
    let digest = document.digest();
    for length in 0..state.len() {
        let prefix = &state[..length];
        if validate_update(prefix, &limits()).is_ok() {
            continue;
        }
        assert!(document.apply_update(prefix, &limits()).is_err());
        assert_eq!(document.digest(), digest, "a refused prefix of {length} bytes changed the document");
    }
    // Every prefix of a state vector, too.
    let state_vector = document.state_vector();
    for length in 0..state_vector.len() {
        assert!(document.diff(&state_vector[..length]).is_err());
    }
}

/// How many arrays are nested, live, at index 0 of the root array `a`.
fn live_array_depth(document: &TextDocument) -> usize {
    let txn = document.doc.transact();
    let Some(mut current) = txn.get_array("a") else { return 0 };
    let mut depth = 0;
    while let Some(yrs::Out::YArray(inner)) = current.get(&txn, 0) {
        depth += 1;
        current = inner;
    }
    depth
}

#[test]
fn type_nesting_is_bounded() {
    fn nested_arrays(depth: usize) -> Vec<Vec<u8>> {
        let doc = Doc::with_client_id(21);
        let root = doc.get_or_insert_array("a");
        let mut updates = Vec::new();
        let mut current = {
            let mut txn = doc.transact_mut();
            let array = root.insert(&mut txn, 0, ArrayPrelim::default());
            updates.push(txn.encode_update_v1());
            array
        };
        for _ in 1..depth {
            let mut txn = doc.transact_mut();
            current = current.insert(&mut txn, 0, ArrayPrelim::default());
            updates.push(txn.encode_update_v1());
        }
        updates.push(state_of(&doc));
        updates
    }
    let limit = limits().nesting_depth_max;

    // All at once: kept up to the limit, the level past it becomes garbage.
    let mut at_limit = TextDocument::new(1);
    at_limit.apply_update(nested_arrays(limit).last().expect("state"), &limits()).expect("at the limit");
    assert_eq!(live_array_depth(&at_limit), limit);
    let past_limit = nested_arrays(limit + 1);
    let mut whole = TextDocument::new(1);
    assert!(whole.apply_update(past_limit.last().expect("state"), &limits()).expect("past the limit"));
    assert_eq!(live_array_depth(&whole), limit);

    // One level per update, in order or in reverse: the same.
    let (_, steps) = past_limit.split_last().expect("steps");
    let mut forward = TextDocument::new(2);
    for step in steps {
        assert!(forward.apply_update(step, &limits()).expect("in order"));
    }
    assert_eq!(live_array_depth(&forward), limit);
    let mut reverse = TextDocument::new(3);
    for step in steps.iter().rev() {
        assert!(reverse.apply_update(step, &limits()).expect("in reverse"));
    }
    assert!(reverse.held.is_empty());
    assert_eq!(live_array_depth(&reverse), limit);
    assert_eq!(reverse.digest(), forward.digest());
    assert_eq!(whole.digest(), forward.digest());

    // The attack that aborts a bare yrs: thousands of nested arrays, then deleting the outermost.
    let attack = nested_arrays(5_000);
    let mut document = TextDocument::new(4);
    assert!(document.apply_update(attack.last().expect("state"), &limits()).expect("applied, mostly as garbage"));
    assert_eq!(live_array_depth(&document), limit);
    let delete = [0, 1, 21, 1, 0, 1];
    assert!(document.apply_update(&delete, &limits()).expect("delete the outermost array"));
    assert_eq!(live_array_depth(&document), 0);
    let loaded = TextDocument::load(4, &document.save(), &[], &limits()).expect("reload");
    assert_eq!(loaded.digest(), document.digest());
}

#[test]
fn a_parent_that_is_not_a_type_becomes_garbage() {
    let mut document = TextDocument::new(1);
    document.insert_text("t", 0, "abc").expect("insert");
    // Client 7 puts an item into "the type held by 1:0", which is a character. Yjs turns such an
    // item into a garbage-collected range; yrs would fail half-way.
    let bad = [1, 1, 7, 0, 4, 0, 1, 0, 1, b'x', 0];
    assert!(document.apply_update(&bad, &limits()).expect("applied as garbage"));
    assert_eq!(document.text("t"), "abc");
    assert!(!document.apply_update(&bad, &limits()).expect("applied twice"));
    let loaded = TextDocument::load(1, &document.save(), &[], &limits()).expect("reload");
    assert_eq!(loaded.digest(), document.digest());
}

#[test]
fn a_failure_inside_yrs_rebuilds_the_document() {
    let mut document = TextDocument::new(1);
    document.insert_text("t", 0, "abc").expect("insert");
    let digest = document.digest();
    // Blind the guard, so that yrs itself meets the bad parent and fails half-way: it integrates
    // the first struct (client 8), then fails on the second (client 7).
    document.nesting = NestingIndex::default();
    let mut bad = vec![2, 1, 8, 0, 4, 1];
    string("t", &mut bad);
    string("z", &mut bad);
    bad.extend_from_slice(&[1, 7, 0, 4, 0, 1, 0, 1, b'x', 0]);
    validate_update(&bad, &limits()).expect("passes the scanner");
    assert!(matches!(document.apply_update(&bad, &limits()), Err(TextError::Integrate(_))));
    assert_eq!(document.digest(), digest);
    assert_eq!(document.text("t"), "abc");
    // The rebuilt document (and its guard) keeps working.
    document.insert_text("t", 3, "d").expect("insert");
    assert_eq!(document.text("t"), "abcd");
    assert!(document.apply_update(&bad, &limits()).expect("the guard sees the bad parent again"));
    assert_eq!(document.text("t").len(), 5);
}

#[test]
fn retained_bytes_are_bounded() {
    let mut author = TextDocument::new(1);
    let update = author.insert_text("t", 0, &"x".repeat(1000)).expect("insert");
    let tight = TextLimits { document_bytes_max: 500, ..limits() };
    let mut replica = TextDocument::new(2);
    assert!(matches!(replica.apply_update(&update, &tight), Err(TextError::DocumentTooLarge { .. })));
    // The log compacts into the checkpoint as it grows.
    for index in 0..200u32 {
        author.insert_text("t", index, "y").expect("insert");
    }
    assert!(author.retained_bytes() <= 2 * author.save().len() + COMPACTION_FLOOR_BYTES);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = validate_update(&bytes, &limits());
        let _ = validate_state_vector(&bytes);
        let mut document = TextDocument::new(1);
        document.insert_text("t", 0, "base").expect("insert");
        let _ = document.apply_update(&bytes, &limits());
        let _ = document.diff(&bytes);
        let _ = document.digest();
    }

    #[test]
    fn mutated_updates_never_panic(
        pick in 0usize..64,
        mutations in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        let updates = yrs_updates();
        let mut bytes = updates[pick % updates.len()].clone();
        for (position, value) in mutations {
            let position = position % bytes.len();
            bytes[position] = value;
        }
        let mut document = TextDocument::new(1);
        document.insert_text("text", 0, "base").expect("insert");
        if document.apply_update(&bytes, &limits()).is_ok() {
            // Whatever was accepted must survive a save and a load.
            let saved = document.save();
            let loaded = TextDocument::load(1, &saved, &[], &limits()).expect("reload what was accepted");
            prop_assert_eq!(loaded.digest(), document.digest());
        }
    }
}

/// A struct for [`encode_update`]: generated updates are valid for the scanner but arbitrary in
/// what they point at, which is what reaches yrs's integration.
#[derive(Debug, Clone)]
enum Generated {
    Gc(u32),
    Skip(u32),
    Item {
        origin: Option<(u64, u32)>,
        right_origin: Option<(u64, u32)>,
        parent: GeneratedParent,
        content: GeneratedContent,
    },
}

#[derive(Debug, Clone)]
enum GeneratedParent {
    Named(&'static str, Option<&'static str>),
    Nested((u64, u32), Option<&'static str>),
}

#[derive(Debug, Clone)]
enum GeneratedContent {
    Deleted(u32),
    String(String),
    Any(u8),
    Type(u8),
    Format,
    Embed,
    Binary,
}

impl GeneratedContent {
    fn length(&self) -> u32 {
        match self {
            GeneratedContent::Deleted(length) => *length,
            GeneratedContent::String(string) => string.encode_utf16().count() as u32,
            GeneratedContent::Any(count) => u32::from(*count),
            _ => 1,
        }
    }
}

/// Encodes generated structs (per client: start clock and structs) and a delete set, fixing up
/// what the scanner would refuse (references to later structs of the same client).
fn encode_update(clients: &[(u64, u32, Vec<Generated>)], deletes: &[(u64, Vec<(u32, u32)>)]) -> Vec<u8> {
    let mut out = Vec::new();
    var(clients.len() as u64, &mut out);
    for (client, start, structs) in clients {
        var(structs.len() as u64, &mut out);
        var(*client, &mut out);
        var(u64::from(*start), &mut out);
        let mut clock = *start;
        for block in structs {
            match block {
                Generated::Gc(length) | Generated::Skip(length) => {
                    out.push(if matches!(block, Generated::Gc(_)) { 0 } else { 10 });
                    var(u64::from(*length), &mut out);
                    clock += length;
                }
                Generated::Item { origin, right_origin, parent, content } => {
                    let fix = |id: (u64, u32)| if id.0 == *client && id.1 >= clock { (id.0 + 1, id.1) } else { id };
                    let origin = origin.map(fix);
                    let right_origin = right_origin.map(fix);
                    let content_ref = match content {
                        GeneratedContent::Deleted(_) => 1,
                        GeneratedContent::Binary => 3,
                        GeneratedContent::String(_) => 4,
                        GeneratedContent::Embed => 5,
                        GeneratedContent::Format => 6,
                        GeneratedContent::Type(_) => 7,
                        GeneratedContent::Any(_) => 8,
                    };
                    let parent_sub = match parent {
                        GeneratedParent::Named(_, key) | GeneratedParent::Nested(_, key) => *key,
                    };
                    let mut info = content_ref;
                    if origin.is_some() {
                        info |= 0x80;
                    }
                    if right_origin.is_some() {
                        info |= 0x40;
                    }
                    if parent_sub.is_some() {
                        info |= 0x20;
                    }
                    out.push(info);
                    for id in [origin, right_origin].into_iter().flatten() {
                        var(id.0, &mut out);
                        var(u64::from(id.1), &mut out);
                    }
                    if origin.is_none() && right_origin.is_none() {
                        match parent {
                            GeneratedParent::Named(name, _) => {
                                out.push(1);
                                string(name, &mut out);
                            }
                            GeneratedParent::Nested(id, _) => {
                                let id = fix(*id);
                                out.push(0);
                                var(id.0, &mut out);
                                var(u64::from(id.1), &mut out);
                            }
                        }
                        if let Some(key) = parent_sub {
                            string(key, &mut out);
                        }
                    }
                    match content {
                        GeneratedContent::Deleted(length) => var(u64::from(*length), &mut out),
                        GeneratedContent::String(text) => string(text, &mut out),
                        GeneratedContent::Any(count) => {
                            out.push(*count);
                            for index in 0..*count {
                                out.extend_from_slice(&[118, 1, 1, b'k', 125, index]);
                            }
                        }
                        GeneratedContent::Type(type_ref) => {
                            out.push(*type_ref);
                            if *type_ref == 3 {
                                string("p", &mut out);
                            }
                        }
                        GeneratedContent::Format => {
                            string("bold", &mut out);
                            string("true", &mut out);
                        }
                        GeneratedContent::Embed => string(r#"{"image":"x"}"#, &mut out),
                        GeneratedContent::Binary => string("bin", &mut out),
                    }
                    clock += content.length();
                }
            }
        }
    }
    var(deletes.len() as u64, &mut out);
    for (client, ranges) in deletes {
        var(*client, &mut out);
        var(ranges.len() as u64, &mut out);
        let mut at = 0;
        for (gap, length) in ranges {
            at += gap;
            var(u64::from(at), &mut out);
            var(u64::from(*length), &mut out);
            at += length;
        }
    }
    out
}

fn generated_id() -> impl Strategy<Value = (u64, u32)> {
    (1u64..6, 0u32..32)
}

fn generated_block() -> impl Strategy<Value = Generated> {
    let parent = prop_oneof![
        (prop_oneof![Just("t"), Just("m"), Just("x")], proptest::option::of(Just("k")))
            .prop_map(|(name, key)| GeneratedParent::Named(name, key)),
        (generated_id(), proptest::option::of(Just("k"))).prop_map(|(id, key)| GeneratedParent::Nested(id, key)),
    ];
    let content = prop_oneof![
        4 => "[a-c😀]{0,4}".prop_map(GeneratedContent::String),
        1 => (0u32..4).prop_map(GeneratedContent::Deleted),
        1 => (0u8..3).prop_map(GeneratedContent::Any),
        2 => prop_oneof![Just(0u8), Just(1), Just(2), Just(3), Just(4), Just(6)].prop_map(GeneratedContent::Type),
        1 => Just(GeneratedContent::Format),
        1 => Just(GeneratedContent::Embed),
        1 => Just(GeneratedContent::Binary),
    ];
    prop_oneof![
        1 => (1u32..4).prop_map(Generated::Gc),
        1 => (1u32..4).prop_map(Generated::Skip),
        12 => (proptest::option::of(generated_id()), proptest::option::of(generated_id()), parent, content)
            .prop_map(|(origin, right_origin, parent, content)| Generated::Item { origin, right_origin, parent, content }),
    ]
}

fn generated_update() -> impl Strategy<Value = Vec<u8>> {
    let client = (1u64..6, 0u32..16, proptest::collection::vec(generated_block(), 0..10));
    let clients = proptest::collection::vec(client, 0..4).prop_map(|mut clients| {
        clients.sort_by_key(|(client, _, _)| *client);
        clients.dedup_by_key(|(client, _, _)| *client);
        clients
    });
    let deletes = proptest::collection::vec((1u64..5, proptest::collection::vec((0u32..4, 1u32..4), 0..3)), 0..3)
        .prop_map(|mut deletes| {
            deletes.sort_by_key(|(client, _)| *client);
            deletes.dedup_by_key(|(client, _)| *client);
            deletes
        });
    (clients, deletes).prop_map(|(clients, deletes)| encode_update(&clients, &deletes))
}

/// Honest-looking traffic: each client has one fixed list of structs (so an id always means the
/// same struct), and each update carries slices of those lists, plus a delete set.
fn consistent_updates() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let universe = proptest::collection::vec(
        proptest::collection::vec(
            generated_block().prop_filter("no skips", |block| !matches!(block, Generated::Skip(_))),
            0..8,
        ),
        4,
    );
    let slices = proptest::collection::vec(
        (
            proptest::collection::vec((0usize..4, any::<usize>(), any::<usize>()), 0..3),
            proptest::collection::vec((2u64..6, proptest::collection::vec((0u32..4, 1u32..4), 0..3)), 0..2),
        ),
        1..8,
    );
    (universe, slices).prop_map(|(mut universe, slices)| {
        honest_map_entries(&mut universe);
        slices
            .into_iter()
            .map(|(picks, mut deletes)| {
                let mut clients: Vec<(u64, u32, Vec<Generated>)> = Vec::new();
                for (index, a, b) in picks {
                    let blocks = &universe[index];
                    let client = index as u64 + 2;
                    if blocks.is_empty() || clients.iter().any(|(known, _, _)| *known == client) {
                        continue;
                    }
                    let (a, b) = (a % blocks.len(), b % blocks.len());
                    let (from, to) = (a.min(b), a.max(b) + 1);
                    let start = blocks[..from].iter().map(generated_length).sum();
                    clients.push((client, start, blocks[from..to].to_vec()));
                }
                deletes.sort_by_key(|(client, _)| *client);
                deletes.dedup_by_key(|(client, _)| *client);
                encode_update(&clients, &deletes)
            })
            .collect()
    })
}

/// Makes map entries look like Yjs's: one unit long, and never anyone's origin (an item placed
/// next to a map entry would inherit its key, and a map entry longer than one unit is not
/// stable under yrs's splitting and re-integration: on reload, its right part deletes its left).
fn honest_map_entries(universe: &mut [Vec<Generated>]) {
    let mut entries: Vec<(u64, u32, u32)> = Vec::new();
    for (index, blocks) in universe.iter_mut().enumerate() {
        let mut clock = 0;
        for block in blocks.iter_mut() {
            if let Generated::Item { parent, content, .. } = block
                && matches!(parent, GeneratedParent::Named(_, Some(_)) | GeneratedParent::Nested(_, Some(_)))
            {
                if content.length() != 1 || matches!(content, GeneratedContent::Deleted(_)) {
                    *content = GeneratedContent::Any(1);
                }
                entries.push((index as u64 + 2, clock, clock + 1));
            }
            clock += generated_length(block);
        }
    }
    let is_entry =
        |id: &(u64, u32)| entries.iter().any(|(client, start, end)| id.0 == *client && *start <= id.1 && id.1 < *end);
    for blocks in universe.iter_mut() {
        for block in blocks.iter_mut() {
            if let Generated::Item { origin, right_origin, .. } = block {
                if origin.as_ref().is_some_and(is_entry) {
                    *origin = None;
                }
                if right_origin.as_ref().is_some_and(is_entry) {
                    *right_origin = None;
                }
            }
        }
    }
}

fn generated_length(block: &Generated) -> u32 {
    match block {
        Generated::Gc(length) | Generated::Skip(length) => *length,
        Generated::Item { content, .. } => content.length(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Updates that pass the scanner but point anywhere, even giving one id two meanings: yrs
    /// must not panic, a refused update must leave the document as it was, and what was
    /// accepted must save and load.
    #[test]
    fn arbitrary_valid_updates_never_panic(updates in proptest::collection::vec(generated_update(), 1..8)) {
        let mut document = TextDocument::new(1);
        document.insert_text("t", 0, "base").expect("insert");
        for update in &updates {
            prop_assert!(validate_update(update, &limits()).is_ok(), "generator made an invalid update: {:?}", validate_update(update, &limits()));
            let before = document.digest();
            match document.apply_update(update, &limits()) {
                Ok(_) => {}
                Err(TextError::Panicked) => prop_assert!(false, "yrs panicked on {:?}", update),
                Err(_) => prop_assert_eq!(document.digest(), before),
            }
            let _ = document.text("t");
            let _ = document.text("m");
            // A local edit in between, where the text allows it.
            let length = document.text("t").encode_utf16().count() as u32;
            let _ = document.insert_text("t", length / 2, "ab");
            let _ = document.delete_text("t", 0, length.min(3));
        }
        let saved = document.save();
        let loaded = TextDocument::load(1, &saved, &[], &limits());
        prop_assert!(loaded.is_ok(), "reload failed: {:?}", loaded.err());
        document.insert_text("t", 0, "more").expect("edit after all that");
    }

    /// With ids that keep one meaning, replicas that receive the same updates in any order agree,
    /// and so does a replica loaded from a save.
    #[test]
    fn consistent_updates_converge(updates in consistent_updates(), seed in any::<u64>()) {
        let mut forward = TextDocument::new(1);
        let mut backward = TextDocument::new(1);
        let mut shuffled = TextDocument::new(1);
        let mut order: Vec<usize> = (0..updates.len()).collect();
        let mut state = seed | 1;
        for index in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(index, (state % (index as u64 + 1)) as usize);
        }
        for (document, order) in [
            (&mut forward, (0..updates.len()).collect::<Vec<_>>()),
            (&mut backward, (0..updates.len()).rev().collect()),
            (&mut shuffled, order),
        ] {
            for index in order {
                let result = document.apply_update(&updates[index], &limits());
                prop_assert!(result.is_ok(), "update {} refused: {:?}", index, result);
            }
        }
        let loaded = TextDocument::load(1, &forward.save(), &[], &limits());
        prop_assert!(loaded.is_ok(), "reload failed: {:?}", loaded.as_ref().err());
        if let Ok(loaded) = loaded {
            prop_assert_eq!(loaded.digest(), forward.digest());
        }
        prop_assert_eq!(forward.text("t"), backward.text("t"));
        prop_assert_eq!(forward.text("t"), shuffled.text("t"));
        prop_assert_eq!(forward.digest(), backward.digest());
        prop_assert_eq!(forward.digest(), shuffled.digest());
    }
}

#[test]
fn reading_shows_every_root_sorted_by_name() {
    let mut document = TextDocument::new(1);
    assert_eq!(document.reading().expect("reading"), Vec::new());
    document.insert_text("title", 0, "Notes").expect("insert");
    document.insert_text("text", 0, "hello").expect("insert");
    // A root that a local edit created but that holds nothing shows nothing.
    document.insert_text("empty", 0, "").expect("insert");
    let expected = vec![("text".to_owned(), "hello".to_owned()), ("title".to_owned(), "Notes".to_owned())];
    assert_eq!(document.reading().expect("reading"), expected);
    assert_eq!(document.text("text"), "hello");

    // A replica's roots are of no type yet (only remote updates touched them): it reads the same.
    let replica = TextDocument::load(2, &document.save(), &[], &limits()).expect("load");
    assert_eq!(replica.reading().expect("reading"), expected);
    document.delete_text("text", 0, 5).expect("delete");
    assert_eq!(document.reading().expect("reading"), vec![("title".to_owned(), "Notes".to_owned())]);
}

#[test]
fn reading_shows_formatting_embeds_and_entries() {
    let doc = Doc::with_options(Options { client_id: ClientID::new(3), ..Options::default() });
    {
        let text = doc.get_or_insert_text("text");
        let map = doc.get_or_insert_map("map");
        let mut txn = doc.transact_mut();
        text.insert(&mut txn, 0, "hello world");
        let bold = HashMap::from([(Arc::from("bold"), Any::Bool(true))]);
        text.format(&mut txn, 0, 5, bold);
        text.insert_embed(&mut txn, 11, any_value(r#"{"image":"a.png","width":2}"#));
        map.insert(&mut txn, "b", 1);
        map.insert(&mut txn, "a", any_value(r#"{"z":[1,"two"],"y":null}"#));
    }
    let mut document = TextDocument::new(1);
    document.apply_update(&state_of(&doc), &limits()).expect("apply");
    let reading = document.reading().expect("reading");
    assert_eq!(
        reading,
        vec![
            ("map".to_owned(), r#"{"delta":[],"entries":{"a":{"y":null,"z":[1,"two"]},"b":1}}"#.to_owned()),
            (
                "text".to_owned(),
                r#"{"delta":[{"attributes":{"bold":true},"insert":"hello"}," world",{"insert":{"image":"a.png","width":2}}]}"#
                    .to_owned()
            ),
        ]
    );
    // The plain text leaves the formatting and the embed out; the reading does not.
    assert_eq!(document.text("text"), "hello world");
    let reloaded = TextDocument::load(2, &document.save(), &[], &limits()).expect("load");
    assert_eq!(reloaded.reading().expect("reading"), reading);

    // The same characters formatted elsewhere read differently.
    let other = Doc::with_options(Options { client_id: ClientID::new(3), ..Options::default() });
    {
        let text = other.get_or_insert_text("text");
        let mut txn = other.transact_mut();
        text.insert(&mut txn, 0, "hello world");
        text.format(&mut txn, 6, 5, HashMap::from([(Arc::from("bold"), Any::Bool(true))]));
    }
    let mut formatted_elsewhere = TextDocument::new(4);
    formatted_elsewhere.apply_update(&state_of(&other), &limits()).expect("apply");
    assert_eq!(formatted_elsewhere.text("text"), "hello world");
    assert_ne!(formatted_elsewhere.reading().expect("reading")[0].1, reading[1].1);
}

/// Found by fuzzing (`fuzz/regressions/text_update/save-load-reorders-text`): yrs 0.28 integrates
/// the save of this accepted update in another order, so the save reloads to the same digest
/// with the root text reordered. The reading tells them apart, which is what the engine's
/// compaction guard relies on.
#[test]
fn reading_tells_a_reordering_save_apart() {
    let update: &[u8] = include_bytes!("../../../fuzz/regressions/text_update/save-load-reorders-text");
    let mut document = TextDocument::new(1);
    assert!(document.apply_update(update, &limits()).expect("accepted"));
    let reloaded = TextDocument::load(1, &document.save(), &[], &limits()).expect("the save loads");
    assert_eq!(reloaded.digest(), document.digest());
    assert_ne!(reloaded.text("text"), document.text("text"));
    assert_ne!(reloaded.reading().expect("reading"), document.reading().expect("reading"));
}

/// Digests of fixed documents, pinned: replicas compare digests (the status digest, the
/// convergence checks), so a node of another version must compute the same value for the same
/// state. A change here is a change of the digest's format and needs a new context string.
#[test]
fn digests_of_fixed_documents_are_stable() {
    let mut rich = TextDocument::new(1);
    let mut digests = Vec::new();
    for update in yrs_updates() {
        rich.apply_update(&update, &limits()).expect("apply");
        digests.push(hex::encode(rich.digest()));
    }
    let mut a = TextDocument::new(1);
    let mut b = TextDocument::new(2);
    let a1 = a.insert_text("t", 0, "hello").expect("insert");
    let b1 = b.insert_text("t", 0, "world").expect("insert");
    let b2 = b.delete_text("t", 1, 2).expect("delete");
    a.apply_update(&b1, &limits()).expect("apply");
    a.apply_update(&b2, &limits()).expect("apply");
    b.apply_update(&a1, &limits()).expect("apply");
    assert_eq!(a.digest(), b.digest());
    digests.push(hex::encode(a.digest()));
    digests.push(hex::encode(TextDocument::new(1).digest()));
    let expected = [
        "68e1fe09436c64e2b4b47b4cc8f14ea29fbab6ff3766930d061e49a9c23b94ea",
        "5a3a94f24675567826a0e916ba36310d0d7e911617575977efdaacce9c3b48fe",
        "7ebaf8a218e386daec29904a6c1b9002c0bd17c5d3bc08ac0f7222827aaa3028",
        "58a99c8815e69ae3d4ce9aaf47052f94211455d3dd04e09c4d86356e612e74df",
        "9fe87fd2f2ee1c580d3521fcb36e78f7a53d127223f7df147027bbb733ab1e54",
        "0e2857afac31d2aeb8e3e4d4ee892d5c3a36d4ac6bd0328a34f121deeb9274c5",
        "932a106f2059826812151a73c1d4c2ea7eba6db8d2f45fb9d3ec387f721aa61e",
        "3855a662e455521389ca56c17f6909333d47e333dddd1043774e670bf806f6af",
        "3855a662e455521389ca56c17f6909333d47e333dddd1043774e670bf806f6af",
        "ea204e7a98d424b67ed3d1f3a9fbfb8851077cd3ad148df92eccafa49b121b88",
        "a355a373ad401b605cb626cb17536c8493aa487a9505992a50e8d161b775a5fc",
    ];
    assert_eq!(digests, expected);
}
