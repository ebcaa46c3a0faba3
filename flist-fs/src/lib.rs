//! Content-addressed images (flists).
