//! Concord store.
