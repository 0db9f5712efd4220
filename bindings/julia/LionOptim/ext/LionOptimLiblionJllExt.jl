# Loaded by Julia (1.9+) when LionOptim and Liblion_jll are both loaded (Project.toml's
# [weakdeps] and [extensions]): LionOptim then uses the jll's liblion, unless LION_LIBRARY
# named a library already. Liblion_jll is built by ../../build_tarballs.jl (BinaryBuilder).
# A weak dependency rather than a hard one, because Liblion_jll is not registered yet; once it
# is, it can move to [deps] and this file's work to LionOptim's __init__.
# Not run: no Julia runtime where it was written.
module LionOptimLiblionJllExt

import LionOptim
import Liblion_jll

function __init__()
    # is_available() is false on a platform the jll has no build for (its path is then "").
    if isempty(get(ENV, "LION_LIBRARY", "")) && Liblion_jll.is_available()
        LionOptim.use_library!(Liblion_jll.liblion_path)
    end
end

end # module
