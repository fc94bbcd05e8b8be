//! Placeholder; see README.md.
