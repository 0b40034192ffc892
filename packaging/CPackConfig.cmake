# Debian package of the qcow2fuse binary: `cpack -G DEB` in the build tree
# (packaging/build-deb.sh does the whole thing).
set(CPACK_PACKAGE_NAME "qcow2fuse")
set(CPACK_PACKAGE_VENDOR "qcow2fuse")
set(CPACK_PACKAGE_CONTACT "qcow2fuse maintainers <qcow2fuse@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "Mount a qcow2 disk image as a plain raw file through FUSE")
set(CPACK_PACKAGE_DESCRIPTION
    "qcow2fuse makes a qcow2 disk image appear as one raw file, so that dd, cp,\n"
    " sha256sum and losetup work on it directly.")
set(CPACK_GENERATOR "DEB")
set(CPACK_DEBIAN_PACKAGE_SECTION "utils")
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
# Library dependencies are read off the binary by dpkg-shlibdeps.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "fuse3")
include(CPack)
