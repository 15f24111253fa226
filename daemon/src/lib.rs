//! caremsgd.
