//! The iotgate binary's library: start-up ([`startup::Application`]), the admin REST API
//! ([`api`]), authentication and roles ([`auth`]), accounts ([`accounts`]), the audit log
//! ([`audit`]), TLS on the main port ([`tls`]) and the [`supervisor::Supervisor`] that turns stored
//! definitions into running modules and replaces exactly the module a change names.

pub mod accounts;
pub mod api;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod error;
pub mod sealing;
pub mod startup;
pub mod supervisor;
pub mod tls;
pub mod token_secrets;
pub mod ui;
