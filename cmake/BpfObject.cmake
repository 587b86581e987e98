# BpfObject.cmake - compile CO-RE BPF programs and generate their libbpf skeletons.
#
#   include(BpfObject)          # finds the tools; sets ZTUN_BPF_TOOLS_FOUND, ZTUN_BPF_MISSING
#   bpf_object(<name> <source.bpf.c> [HEADERS <h>...] [SKELETON <skel name>])
#
# bpf_object() generates, in the current binary dir:
#   vmlinux.h          from the running kernel's BTF (`bpftool btf dump ... format c`), once
#                      per build tree; never committed (it describes the build machine's kernel,
#                      CO-RE relocates against the target kernel's BTF at load time)
#   <name>.bpf.o       clang -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_<arch>
#   <name>.skel.h      bpftool gen skeleton <name>.bpf.o name <skel name> (the object bytes are
#                      embedded: nothing is read from disk at run time)
# and an INTERFACE target <name>_skel whose include path holds the skeleton and the headers.
# Keep the skeleton name distinct from the loader's own types (the default is <name>_skel).

find_program(BPF_CLANG NAMES clang clang-19 clang-18 clang-17 clang-16 clang-15 clang-14
             DOC "clang able to target BPF")
find_program(BPF_BPFTOOL NAMES bpftool PATHS /usr/sbin /sbin DOC "bpftool")
set(BPF_VMLINUX_BTF "/sys/kernel/btf/vmlinux" CACHE FILEPATH "kernel BTF used to generate vmlinux.h")
find_package(PkgConfig QUIET)
if(PkgConfig_FOUND)
  pkg_check_modules(LIBBPF QUIET IMPORTED_TARGET libbpf>=1.0)
endif()

set(ZTUN_BPF_MISSING "")
if(NOT BPF_CLANG)
  list(APPEND ZTUN_BPF_MISSING "clang")
else()
  execute_process(COMMAND ${BPF_CLANG} --version OUTPUT_VARIABLE _bpf_clang_v ERROR_QUIET)
  if(_bpf_clang_v MATCHES "clang version ([0-9]+)" AND CMAKE_MATCH_1 LESS 14)
    list(APPEND ZTUN_BPF_MISSING "clang >= 14 (found ${CMAKE_MATCH_1})")
  endif()
endif()
if(NOT BPF_BPFTOOL)
  list(APPEND ZTUN_BPF_MISSING "bpftool")
endif()
if(NOT LIBBPF_FOUND)
  list(APPEND ZTUN_BPF_MISSING "libbpf >= 1.0 (libbpf-dev)")
endif()
if(NOT EXISTS "${BPF_VMLINUX_BTF}")
  list(APPEND ZTUN_BPF_MISSING "kernel BTF (${BPF_VMLINUX_BTF})")
endif()
if(ZTUN_BPF_MISSING)
  set(ZTUN_BPF_TOOLS_FOUND FALSE)
  string(REPLACE ";" ", " ZTUN_BPF_MISSING "${ZTUN_BPF_MISSING}")
else()
  set(ZTUN_BPF_TOOLS_FOUND TRUE)
endif()

if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64")
  set(BPF_TARGET_ARCH x86)
elseif(CMAKE_SYSTEM_PROCESSOR MATCHES "aarch64|arm64")
  set(BPF_TARGET_ARCH arm64)
else()
  string(TOLOWER "${CMAKE_SYSTEM_PROCESSOR}" BPF_TARGET_ARCH)
endif()

function(bpf_object name source)
  cmake_parse_arguments(BPF "" "SKELETON" "HEADERS" ${ARGN})
  if(NOT BPF_SKELETON)
    set(BPF_SKELETON ${name}_skel)
  endif()
  set(out ${CMAKE_CURRENT_BINARY_DIR})
  get_filename_component(src ${source} ABSOLUTE)
  get_filename_component(srcdir ${src} DIRECTORY)
  set(hdrs "")
  foreach(h ${BPF_HEADERS})
    get_filename_component(habs ${h} ABSOLUTE)
    list(APPEND hdrs ${habs})
  endforeach()

  # One vmlinux.h rule per binary directory, however many objects it builds.
  get_property(have_vmlinux DIRECTORY PROPERTY BPF_VMLINUX_RULE)
  if(NOT have_vmlinux)
    set_property(DIRECTORY PROPERTY BPF_VMLINUX_RULE TRUE)
    add_custom_command(OUTPUT ${out}/vmlinux.h
      COMMAND ${BPF_BPFTOOL} btf dump file ${BPF_VMLINUX_BTF} format c > ${out}/vmlinux.h.tmp
      COMMAND ${CMAKE_COMMAND} -E rename ${out}/vmlinux.h.tmp ${out}/vmlinux.h
      COMMENT "vmlinux.h from ${BPF_VMLINUX_BTF}"
      VERBATIM)
  endif()

  add_custom_command(OUTPUT ${out}/${name}.bpf.o
    COMMAND ${BPF_CLANG} -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_${BPF_TARGET_ARCH}
            -Wall -Werror -I${out} -I${srcdir} ${LIBBPF_CFLAGS}
            -c ${src} -o ${out}/${name}.bpf.o
    DEPENDS ${src} ${hdrs} ${out}/vmlinux.h
    COMMENT "BPF ${name}.bpf.o"
    VERBATIM)
  add_custom_command(OUTPUT ${out}/${name}.skel.h
    COMMAND ${BPF_BPFTOOL} gen skeleton ${out}/${name}.bpf.o name ${BPF_SKELETON}
            > ${out}/${name}.skel.h.tmp
    COMMAND ${CMAKE_COMMAND} -E rename ${out}/${name}.skel.h.tmp ${out}/${name}.skel.h
    DEPENDS ${out}/${name}.bpf.o
    COMMENT "BPF skeleton ${name}.skel.h"
    VERBATIM)
  add_custom_target(${name}_skel_gen DEPENDS ${out}/${name}.skel.h)
  add_library(${name}_skel INTERFACE)
  add_dependencies(${name}_skel ${name}_skel_gen)
  target_include_directories(${name}_skel INTERFACE ${out} ${srcdir})
  target_link_libraries(${name}_skel INTERFACE PkgConfig::LIBBPF)
endfunction()
