//! Shared home of the examples and tests; see README.md.
