//! (module under construction: see lib.rs for its purpose)
