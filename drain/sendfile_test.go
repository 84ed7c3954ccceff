package drain

import (
	"context"
	"crypto/sha256"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// countingTCP stands in for the accepted *net.TCPConn and records whether
// net/http's ReadFrom reached it with the file still visible: the
// condition for the kernel's sendfile/splice (net.TCPConn.ReadFrom).
type countingTCP struct {
	*net.TCPConn
	fileReads *atomic.Int64 // ReadFrom calls whose source is an *os.File
}

func (c countingTCP) ReadFrom(r io.Reader) (int64, error) {
	src := r
	if lr, ok := r.(*io.LimitedReader); ok {
		src = lr.R
	}
	if _, ok := src.(*os.File); ok {
		c.fileReads.Add(1)
	}
	return c.TCPConn.ReadFrom(r)
}

type countingListener struct {
	net.Listener
	fileReads *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return countingTCP{c.(*net.TCPConn), l.fileReads}, nil
}

// The wrapper drain puts around every accepted connection must keep
// io.ReaderFrom, or net/http cannot use sendfile/splice.
func TestWrappedConnKeepsReaderFrom(t *testing.T) {
	var c net.Conn = &hconn{}
	if _, ok := c.(io.ReaderFrom); !ok {
		t.Fatal("hconn does not implement io.ReaderFrom: net/http falls back to 32 KiB writes")
	}
	var w http.ResponseWriter = &closeWriter{}
	if _, ok := w.(io.ReaderFrom); !ok {
		t.Fatal("the drain's ResponseWriter does not implement io.ReaderFrom: io.Copy to it never reaches the conn's")
	}
}

// http.FileServer under drain.Serve hands the file itself to the TCP
// connection's ReadFrom (the sendfile path), with handoff bookkeeping on.
func TestFileServerReachesTCPReadFrom(t *testing.T) {
	dir := t.TempDir()
	data := make([]byte, 1<<20)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var fileReads atomic.Int64
	srv := &http.Server{Handler: http.FileServer(http.Dir(dir))}
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() {
		served <- Serve(ctx, srv, []net.Listener{countingListener{l, &fileReads}}, Options{NoReady: true})
	}()
	defer func() {
		cancel()
		if err := <-served; err != nil {
			t.Error(err)
		}
	}()
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}
	resp, err := client.Get("http://" + l.Addr().String() + "/f")
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		t.Fatalf("body differs from the file (%d bytes, want %d)", len(got), len(data))
	}
	if n := fileReads.Load(); n == 0 {
		t.Fatal("the file never reached the TCP connection's ReadFrom: no sendfile")
	}
}
