// Command plainhttp is the most common shape of a Go HTTP server, left as a
// new user of upgrader would bring it: net/http serving the listener it
// inherits on fd 3 (LISTEN_FDS), and http.Server.Shutdown on SIGTERM. It
// knows nothing of upgrader (no READY=1, no drain package), so that the
// recipes in docs/unchanged-servers.md measure what such a server loses
// through upgrades, and what upgrader can remove for it.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	ln, err := net.FileListener(os.NewFile(3, "LISTEN_FDS"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "plainhttp: listener on fd 3:", err)
		os.Exit(1)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "hello\n")
	})}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, syscall.SIGINT)
	done := make(chan struct{})
	go func() {
		<-term
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			fmt.Fprintln(os.Stderr, "plainhttp: shutdown:", err)
		}
		close(done)
	}()
	if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		fmt.Fprintln(os.Stderr, "plainhttp: serve:", err)
		os.Exit(1)
	}
	<-done
}
