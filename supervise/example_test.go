package supervise_test

import (
	"context"
	"fmt"
	"log"
	"time"

	"github.com/seed6cb0314a/upgrader/supervise"
)

// A supervisor run from Go: sleep(1) as the worker, which needs no
// listener code (it is ready once alive for 50 ms), upgraded once, then
// stopped. The program's main calls supervise.Init first; here the test
// binary's TestMain does.
func Example() {
	l, err := supervise.Listen("tcp://127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	cfg := supervise.DefaultConfig()
	cfg.Command = []string{"sleep", "60"}
	cfg.Ready = supervise.ReadyMode{Kind: supervise.ReadyDelay, Delay: 50 * time.Millisecond}
	cfg.Listeners = []*supervise.Listener{l}
	sup, err := supervise.New(cfg)
	if err != nil {
		log.Fatal(err)
	}
	ctx := context.Background()
	done := make(chan error, 1)
	go func() { done <- sup.Run(ctx) }()

	// Asked while generation 1 is still starting, the upgrade waits for it.
	r, err := sup.Upgrade(ctx)
	if err != nil {
		log.Fatal(err)
	}
	if r.OK {
		fmt.Printf("generation %d ok\n", r.Generation)
	} else {
		fmt.Printf("generation %d failed: %s\n", r.Generation, r.Reason)
	}

	st, err := sup.Status(ctx)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("current generation", st.Current)

	if err := sup.Stop(ctx); err != nil {
		log.Fatal(err)
	}
	if err := <-done; err != nil {
		log.Fatal(err)
	}
	fmt.Println("stopped")
	// Output:
	// generation 2 ok
	// current generation 2
	// stopped
}
