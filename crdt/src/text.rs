//! Collaborative text documents backed by yrs (placeholder until the text module lands).
