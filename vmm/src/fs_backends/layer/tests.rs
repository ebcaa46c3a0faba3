//! Unit tests of the writable layer, driving its FileSystem methods directly.
