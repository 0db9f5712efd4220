# find_package(lion CONFIG): the imported targets lion::lion (shared) and lion::lion_static.
get_filename_component(_lion_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
if(NOT TARGET lion::lion)
  add_library(lion::lion SHARED IMPORTED)
  set_target_properties(lion::lion PROPERTIES
    IMPORTED_LOCATION "${_lion_prefix}/lib/liblion.so"
    IMPORTED_SONAME "liblion.so.1"  # the ABI's major version; programs record NEEDED liblion.so.1
    INTERFACE_INCLUDE_DIRECTORIES "${_lion_prefix}/include")
endif()
if(NOT TARGET lion::lion_static AND EXISTS "${_lion_prefix}/lib/liblion.a")
  add_library(lion::lion_static STATIC IMPORTED)
  set_target_properties(lion::lion_static PROPERTIES
    IMPORTED_LOCATION "${_lion_prefix}/lib/liblion.a"
    INTERFACE_INCLUDE_DIRECTORIES "${_lion_prefix}/include"
    INTERFACE_LINK_LIBRARIES "gcc_s;util;rt;pthread;m;dl")
endif()
set(lion_FOUND TRUE)
unset(_lion_prefix)
