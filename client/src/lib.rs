//! latchkey client
