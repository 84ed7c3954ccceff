// Command drainhttp is integration/cmd/plainhttp with the one change
// docs/unchanged-servers.md gives for Go: drain.Serve in place of Serve,
// sd_notify and Shutdown on SIGTERM. drain.Serve says READY=1 once
// serving and, at the drain signal, closes keep-alive connections only
// after a "Connection: close", so that the benchmark of the recipes shows
// what the diff buys.
package main

import (
	"context"
	"io"
	"log"
	"net"
	"net/http"
	"os"

	"github.com/seed6cb0314a/upgrader/drain"
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
	if err := drain.Serve(context.Background(), srv, []net.Listener{ln}, drain.Options{}); err != nil {
		log.Fatalln("serve:", err)
	}
}
