-- wrk script of scenario 7 (cache misses, bench/bench.py): every request
-- gets a URI of its own, <url path><tag>-<thread>-<n>, so each one misses
-- the cache.  The tag is unique per wrk run and is passed after "--":
--   wrk -t1 -c50 -d4s --latency -s misses.lua http://.../guard_1m/store/ -- r3
local counter = 0
local threads = 0

function setup(thread)
   threads = threads + 1
   thread:set("thread_id", threads)
end

function init(args)
   tag = args[1] or "run"
end

function request()
   counter = counter + 1
   return wrk.format(nil, wrk.path .. tag .. "-" .. thread_id .. "-" .. counter)
end
