//! Shared helpers for the bench binaries in src/bin.
