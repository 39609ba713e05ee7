//! version_vector
