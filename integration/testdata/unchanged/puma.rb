# puma's settings under upgrader (docs/unchanged-servers.md): serve the
# socket upgrader passes (LISTEN_FDS) and no other; READY=1 goes through
# the sd_notify gem, which puma loads itself when NOTIFY_SOCKET is set.
bind_to_activated_sockets 'only'
quiet
