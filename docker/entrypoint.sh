#!/bin/sh
# The trainer image's entrypoint: run the command as the owner of the mounted project (/workspace), so that
# what it writes there is theirs, whoever they are: root on a root host, uid 1000 on a laptop, a cluster
# user in group 100. No ids are built into the image. Started as root (the default), it hands the home and
# its cache volume to that owner and drops to it; started as someone else (docker run --user, rootless
# engines), it runs as that user.
set -eu
if [ "$(id -u)" = 0 ]; then
    owner=$(stat -c %u:%g /workspace)
    chown "$owner" "$HOME"
    [ "$(stat -c %u:%g "$HOME/.cache")" = "$owner" ] || chown -R "$owner" "$HOME/.cache"
    [ "$owner" = 0:0 ] || exec setpriv --reuid="${owner%:*}" --regid="${owner#*:}" --clear-groups -- "$@"
fi
exec "$@"
