//! `forward_fs!`: `FileSystem` methods that a wrapper passes on to the filesystem it wraps
//! unchanged (the layers of the writable-layer overlay override only a few).

/// Implements each listed `FileSystem` method as a call of the same method on `self.$field`.
macro_rules! forward_fs {
    ($field:ident; $( fn $name:ident(&self $(, $arg:ident: $ty:ty)* $(,)?) $(-> $ret:ty)?; )*) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $name(&self $(, $arg: $ty)*) $(-> $ret)? {
                self.$field.$name($($arg),*)
            }
        )*
    };
}
