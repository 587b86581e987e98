# One place for compiler warnings and sanitizer switches of the C core.
set(ZTUN_SANITIZE "" CACHE STRING "Build the C core with a sanitizer: address, undefined or thread")

function(ztun_target_warnings target)
  target_compile_options(${target} PRIVATE
    -Wall -Wextra -Wshadow -Wpointer-arith -Wstrict-prototypes -Wmissing-prototypes
    -Wno-unused-parameter -Wno-format-truncation -Werror=implicit-function-declaration -Werror=incompatible-pointer-types
    -Werror=return-type -fno-strict-aliasing)
  if(ZTUN_SANITIZE)
    target_compile_options(${target} PRIVATE -fsanitize=${ZTUN_SANITIZE} -fno-omit-frame-pointer)
    target_link_options(${target} PUBLIC -fsanitize=${ZTUN_SANITIZE})
  endif()
endfunction()
