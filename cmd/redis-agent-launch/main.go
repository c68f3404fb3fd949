// Command redis-agent-launch is the step between redis-agent and every
// redis-server it starts: it confines itself by the policy in its
// arguments (package confine: no_new_privs, Landlock, seccomp) and execs
// the command after "--", which keeps all of it. It is a binary of its
// own, beside redis-agent, so that the step costs a small Go program's
// start rather than the agent's.
//
//	redis-agent-launch [--exec F]... [--ro P]... [--rw P]... [--no-landlock] [--no-seccomp] -- redis-server redis.conf
//	redis-agent-launch --probe    what the kernel supports, as key=value
package main

import (
	"fmt"
	"os"

	"github.com/redis-agent/redis-agent/confine"
)

func main() {
	if len(os.Args) == 2 && os.Args[1] == "--probe" {
		s := confine.Probe()
		fmt.Printf("landlock=%d seccomp=%t\n", s.Landlock, s.Seccomp)
		return
	}
	p, argv, err := confine.Parse(os.Args[1:])
	if err == nil {
		err = confine.Apply(p)
	}
	if err == nil {
		err = confine.Exec(argv)
	}
	// Its stderr is the instance's log: the reason is where an operator
	// looks for why redis-server did not start.
	fmt.Fprintln(os.Stderr, "redis-agent-launch:", err)
	os.Exit(126)
}
