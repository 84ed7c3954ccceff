// Command plainhttp is the most common shape of a Go server under a
// socket-activating supervisor, not built on upgrader's drain package:
// net/http serving the listener at fd 3 (LISTEN_FDS), READY=1 through
// go-systemd's sd_notify, and http.Server.Shutdown on SIGTERM. Every
// response names its generation in X-Generation (UPGRADER_GENERATION).
// The integration tests run it unchanged under upgrader to show what a
// server that knows nothing of upgrader loses at an upgrade.
package main

import (
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
)

func main() {
	ln, err := net.FileListener(os.NewFile(3, "listener"))
	if err != nil {
		log.Fatalln("fd 3:", err)
	}
	gen := os.Getenv("UPGRADER_GENERATION")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Generation", gen)
		io.WriteString(w, "hello\n")
	})}
	done := make(chan struct{})
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM)
		<-sig
		if err := srv.Shutdown(context.Background()); err != nil {
			log.Println("shutdown:", err)
		}
		close(done)
	}()
	daemon.SdNotify(false, daemon.SdNotifyReady)
	if err := srv.Serve(ln); err != http.ErrServerClosed {
		log.Fatalln("serve:", err)
	}
	<-done
}
