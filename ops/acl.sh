#!/bin/sh
# Render ops/acl.conf into a Redis ACL file (printed on stdout).
#
#   sh ops/acl.sh                   the server-wide users (default off, admin) and the users
#                                   of the default prefix cachesaver: (cachesaver-client, ...)
#   sh ops/acl.sh PREFIX [NAME]     only the users of another tenant (PREFIX ends with :): keys and channels
#                                   under PREFIX, users NAME-client, NAME-cache-worker, ...
#                                   (NAME defaults to PREFIX without its trailing colon)
#
# Passwords come from CACHESAVER_ACL_{ADMIN,CLIENT,CACHE_WORKER,BATCH_WORKER,OPERATOR}_PASSWORD
# (ADMIN only without PREFIX) and, for the optional direct-client user (OnlineAPI(direct=True)),
# CACHESAVER_ACL_DIRECT_CLIENT_PASSWORD; only their SHA-256 hashes are written. Comments are
# dropped: an aclfile takes none.
set -eu

template="$(dirname "$0")/acl.conf"
prefix="cachesaver:" name="cachesaver" server=yes
if [ $# -ge 1 ]; then
    prefix=$1 name=${2:-${1%:}} server=no
fi
if [ $# -gt 2 ] || [ "$prefix" = "${prefix#[A-Za-z0-9]}" ] ||
        printf '%s' "$prefix" | grep -q '[^A-Za-z0-9_.:-]' ||
        [ -z "$name" ] || printf '%s' "$name" | grep -q '[^A-Za-z0-9_.-]'; then
    echo "usage: sh ops/acl.sh [PREFIX [NAME]]: PREFIX of letters, digits, _ . - : (starting" \
         "with a letter or digit), NAME of letters, digits, _ . -" >&2
    exit 2
fi
if [ "$prefix" = "${prefix%:}" ]; then
    echo "ops/acl.sh: PREFIX $prefix must end with ':' (else its rules, ~${prefix}s:* ..., also" \
         "match the keys of a tenant whose prefix starts with $prefix): use $prefix:" >&2
    exit 2
fi

sha256() {
    if command -v sha256sum >/dev/null 2>&1; then sha256sum; else shasum -a 256; fi | cut -c1-64
}

hashes="" skip='^$'
if [ -z "${CACHESAVER_ACL_DIRECT_CLIENT_PASSWORD:-}" ]; then
    skip='^user cachesaver-direct-client '
    echo "ops/acl.sh: no direct-client user (for OnlineAPI(direct=True)): set" \
         "CACHESAVER_ACL_DIRECT_CLIENT_PASSWORD to render it" >&2
fi
for role in ADMIN CLIENT CACHE_WORKER BATCH_WORKER OPERATOR DIRECT_CLIENT; do
    [ "$role" = DIRECT_CLIENT ] && [ "$skip" != '^$' ] && continue
    [ "$role" = ADMIN ] && [ "$server" = no ] && continue
    password=$(eval "printf '%s' \"\${CACHESAVER_ACL_${role}_PASSWORD:-}\"")
    if [ -z "$password" ]; then
        echo "ops/acl.sh: set CACHESAVER_ACL_${role}_PASSWORD" >&2
        exit 2
    fi
    hashes="$hashes -e s/#SHA256_OF_${role}_PASSWORD/#$(printf '%s' "$password" | sha256)/"
done

{
    if [ "$server" = yes ]; then
        grep '^user ' "$template" | grep -v '^user cachesaver-'
    fi
    grep '^user cachesaver-' "$template" | grep -v "$skip" |
        sed -e "s|cachesaver:|$prefix|g" -e "s|^user cachesaver-|user $name-|"
} | sed $hashes
