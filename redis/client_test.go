package redis

import goredis "github.com/redis/go-redis/v9"

// client returns a go-redis client logged in as a's user, for tests that
// act as a tenant or need commands Admin does not offer; the caller
// closes it.
func (a *Admin) client() *goredis.Client {
	o := &goredis.Options{Addr: a.addr, Username: a.user, Password: a.secret,
		MaxRetries: -1, DisableIdentity: true, Protocol: 2, PoolSize: 1}
	if len(a.addr) > 0 && a.addr[0] == '/' {
		o.Network = "unix"
	}
	return goredis.NewClient(o)
}
