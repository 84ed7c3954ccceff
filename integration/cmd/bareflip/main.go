// Command bareflip is the baseline of the embedded-mode benchmark
// (integration/embed_bench_test.go): examples/hello's greeting served by a
// bare tableflip server, written as tableflip's documentation shows
// (Example_httpShutdown): Listen and Ready through the Upgrader, Upgrade
// on a signal (SIGUSR2 or SIGHUP), and on Exit http.Server.Shutdown.
// Every response names the process in X-Pid, and in X-Generation, which
// counts up at each upgrade, as hello's does.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
)

const genEnv = "BAREFLIP_GENERATION"

func main() {
	listenAddr := flag.String("addr", "127.0.0.1:8080", "address to listen on")
	pidFile := flag.String("pid-file", "", "path to the pid file")
	flag.Parse()
	log.SetPrefix(fmt.Sprintf("%d ", os.Getpid()))

	gen, _ := strconv.Atoi(os.Getenv(genEnv))
	gen = max(gen, 1)
	upg, err := tableflip.New(tableflip.Options{PIDFile: *pidFile})
	if err != nil {
		panic(err)
	}
	defer upg.Stop()

	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGUSR2, syscall.SIGHUP)
		for range sig {
			os.Setenv(genEnv, strconv.Itoa(gen+1))
			if err := upg.Upgrade(); err != nil {
				log.Println("Upgrade failed:", err)
			}
		}
	}()

	ln, err := upg.Listen("tcp", *listenAddr)
	if err != nil {
		log.Fatalln("Can't listen:", err)
	}
	pid, g := strconv.Itoa(os.Getpid()), strconv.Itoa(gen)
	server := http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("X-Pid", pid)
		w.Header().Set("X-Generation", g)
		fmt.Fprintf(w, "hello from pid %s generation %s\n", pid, g)
	})}
	go func() {
		if err := server.Serve(ln); err != http.ErrServerClosed {
			log.Println("HTTP server:", err)
		}
	}()
	if err := upg.Ready(); err != nil {
		panic(err)
	}
	<-upg.Exit()
	time.AfterFunc(30*time.Second, func() {
		log.Println("Graceful shutdown timed out")
		os.Exit(1)
	})
	server.Shutdown(context.Background())
}
