//! Test suites only; see the `[[test]]` targets.
