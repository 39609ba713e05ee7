//! Concord transport.
