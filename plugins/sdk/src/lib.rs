//! caremsg plugin SDK.
