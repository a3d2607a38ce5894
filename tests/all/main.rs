//! End-to-end tests of the `wharf` binary.

mod cli;
mod control;
mod crash;
mod hardening;
mod image;
mod peers;
mod registry;
mod run;
mod samples;
mod server;
mod support;
