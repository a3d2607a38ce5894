//! End-to-end tests of the `wharf` binary.

mod run;
mod samples;
mod support;
