//! End-to-end tests of the `wharf` binary.

mod bench;
mod cli;
mod control;
mod crash;
mod edge;
mod fake;
mod hardening;
mod image;
mod ingress;
mod isolation;
mod nodes;
mod peers;
mod registry;
mod remote;
mod replicas;
mod run;
mod samples;
mod serve;
mod server;
mod soak;
mod state;
mod support;
