# One way to build an engine plugin: a C/C++ shared library that links an engine's static,
# position-independent archives (a ggml project built by scripts/lib/engines.sh) and exports
# nothing but `pb_plugin_entry`, so that it can share a process with other plugins carrying
# their own copy of ggml.
#
#   include(../cmake/PatchbayEnginePlugin.cmake)
#   patchbay_engine_plugin(PatchbayWhisperPlugin
#       ENGINE_BUILD "${WHISPER_CPP_BUILD}"
#       ARCHIVES whisper ggml ggml-base ggml-cpu      # must be there
#       OPTIONAL_ARCHIVES ggml-cuda                    # linked when built
#       SOURCES plugin.cpp engine.cpp
#       INCLUDES "${WHISPER_CPP_SOURCE}/include"
#       LINK_OPTIONS "-Wl,--wrap=...")
#
# The library is written to PATCHBAY_PLUGIN_OUTPUT_DIR, beside the plugins `swift build` makes.
include_guard(GLOBAL)

set(PATCHBAY_PLUGIN_OUTPUT_DIR "${CMAKE_BINARY_DIR}" CACHE PATH "where the plugin's .so is written")
if(NOT CMAKE_BUILD_TYPE)
    set(CMAKE_BUILD_TYPE Release)  # the plugin's own code runs on every request
endif()
set(CMAKE_CXX_STANDARD 17)
set(CMAKE_CXX_STANDARD_REQUIRED ON)
find_package(Threads REQUIRED)
find_package(OpenMP)

get_filename_component(PATCHBAY_PLUGINS_DIR "${CMAKE_CURRENT_LIST_DIR}/.." ABSOLUTE)

function(patchbay_engine_plugin target)
    cmake_parse_arguments(PARSE_ARGV 1 arg "" "ENGINE_BUILD" "ARCHIVES;OPTIONAL_ARCHIVES;SOURCES;INCLUDES;LINK_OPTIONS")

    # Every static library of the engine build the plugin needs, linked as one group so
    # their order does not matter.
    set(archives)
    foreach(name IN LISTS arg_ARCHIVES arg_OPTIONAL_ARCHIVES)
        file(GLOB_RECURSE found "${arg_ENGINE_BUILD}/lib${name}.a")
        list(FILTER found EXCLUDE REGEX "/CMakeFiles/")
        if(NOT found AND name IN_LIST arg_ARCHIVES)
            message(FATAL_ERROR "lib${name}.a is not in ${arg_ENGINE_BUILD}: build the engine with -DBUILD_SHARED_LIBS=OFF.")
        endif()
        list(APPEND archives ${found})
    endforeach()

    # The plugin support every C plugin shares (Plugins/PluginSupport): the entry point,
    # events for the host's ABI minor, logging, JSON.
    file(GLOB support_sources "${PATCHBAY_PLUGINS_DIR}/PluginSupport/*.c")
    add_library(${target} SHARED ${arg_SOURCES} ${support_sources})
    target_include_directories(${target} PRIVATE
        "${PATCHBAY_PLUGINS_DIR}/../Sources/CPatchbayABI/include"
        "${PATCHBAY_PLUGINS_DIR}/PluginSupport/include"
        ${arg_INCLUDES})
    set_target_properties(${target} PROPERTIES
        C_VISIBILITY_PRESET hidden
        CXX_VISIBILITY_PRESET hidden
        VISIBILITY_INLINES_HIDDEN ON
        LIBRARY_OUTPUT_DIRECTORY "${PATCHBAY_PLUGIN_OUTPUT_DIR}")

    # --exclude-libs keeps the archives' symbols out of the dynamic table; the version
    # script leaves exactly one name in it.
    set(exports "${PATCHBAY_PLUGINS_DIR}/cmake/exports.map")
    target_link_options(${target} PRIVATE
        "-Wl,--exclude-libs,ALL" "-Wl,--version-script=${exports}" "-Wl,--no-undefined" ${arg_LINK_OPTIONS})
    set_property(TARGET ${target} APPEND PROPERTY LINK_DEPENDS "${exports}")
    target_link_libraries(${target} PRIVATE
        -Wl,--start-group ${archives} -Wl,--end-group Threads::Threads ${CMAKE_DL_LIBS})
    if(OpenMP_CXX_FOUND)
        target_link_libraries(${target} PRIVATE OpenMP::OpenMP_CXX)
    endif()
endfunction()
